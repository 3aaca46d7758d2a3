"""Build the native CPU kernels ahead of their first use: `python -m jaxrnn.kernels`.

The library is compiled once per machine (source, compiler, jaxlib and CPU) and cached on disk
(`jaxrnn.kernels.library`); without this command the first training step that uses it pays for
the build. Prints the library's path and whether it was built now or found in the cache; exits
with status 1, and the reason, where the kernels are not available (the `lax.scan` path is used
then).
"""
import sys
import time

from jaxrnn import kernels


def main() -> int:
  start = time.perf_counter()
  if kernels.library() is None:
    print(f"jaxrnn native kernels: not available ({kernels.build_error()}); every path runs "
          "through lax.scan", file=sys.stderr)
    return 1
  info = kernels.library_info()
  how = ("found in the cache" if info["built_s"] is None
         else f"built in {info['built_s']:.1f} s")
  print(f"jaxrnn native kernels: {info['path']} ({how}; {time.perf_counter() - start:.1f} s "
        "in all)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
