"""dedupd's hashing library on one recipe, for bench_hash's side-by-side run of the
recipes: `python ref_recipe.py v1|v2|v2+look FILE...`.

v1 is the recipe before border trimming (`dhash:8:fast:area:v1`), v2 today's default
(what `dedupd hash` runs), v2+look adds the confirming signature (what the daemon, `scan`
and `check` compute). No digest, as `dedupd hash`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dedupd.hashing import Recipe, hash_file  # noqa: E402

if __name__ == "__main__":
    which, paths = sys.argv[1], sys.argv[2:]
    recipe = Recipe(version=1 if which == "v1" else 2)
    look = which == "v2+look"
    for p in paths:
        h = hash_file(p, recipe, digest=False, second_look=look)
        print(f"{h.hex}  {p}")
