#!/usr/bin/env bash
# Packaging check: `python -m build` makes a wheel and an sdist, and each one
# installs (dependencies resolved from the index) into a fresh venv and imports
# from outside the repository with the version pyproject.toml declares.
# Run from the CI venv (it needs `build`, which the `test` extra installs).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

expected=$(python -c \
  'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')

python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
  cat "$work/build.log"
  exit 1
}
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)

# What a user or a packager looks for in each artefact (and no venv in the sdist).
python - "$wheel" "$sdist" <<'EOF'
import sys, tarfile, zipfile

wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)
members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
for required in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml",
                 "distrax_mixcdf/__init__.py", "tests/conftest.py", "docs/index.md"):
    assert required in members, f"sdist lacks {required}"
assert not any(m.startswith((".venv/", "site/")) for m in members)
EOF

# One fresh venv per artefact, installed side by side (pip mostly waits on I/O).
check() {
  local artefact=$1 venv="$work/venv-$(basename "$1")" got
  python -m venv "$venv"
  # --no-compile: byte-compiling every dependency takes CPU from the tests beside it.
  "$venv/bin/python" -m pip install --quiet --no-compile "$artefact"
  # From outside the checkout, so the import cannot pick up the source tree.
  got=$(cd "$work" && "$venv/bin/python" -c \
    'import distrax_mixcdf as dm; print(dm.__version__)')
  if [[ "$got" != "$expected" ]]; then
    echo "$(basename "$artefact"): imported version '$got', pyproject says '$expected'"
    return 1
  fi
  echo "$(basename "$artefact"): installs and imports, version $got"
}
check "$wheel" >"$work/wheel.log" 2>&1 &
wheel_job=$!
check "$sdist" >"$work/sdist.log" 2>&1 &
sdist_job=$!
status=0
wait "$wheel_job" || status=1
wait "$sdist_job" || status=1
cat "$work/wheel.log" "$work/sdist.log"
((status == 0)) || exit 1
echo "package check passed in $((SECONDS - start)) s"
