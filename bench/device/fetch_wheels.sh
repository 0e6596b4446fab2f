#!/usr/bin/env bash
# Here (with PyPI): the wheels of bench/device/wheels.txt for the device machine (CPython 3.12, x86_64), into .whl/
# at the repository root, which a device call carries (`carry: [".whl"]`). Staged in a new folder and renamed, so a
# wheel of an older list never stays beside the new one.
set -euo pipefail
cd "$(dirname "$0")/../.."
limit_mib=48  # a call carries 64 MiB in all, the working tree included
stage=$(mktemp -d .whl.staging.XXXXXX)
trap 'rm -rf "$stage"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$stage" -r bench/device/wheels.txt 2> >(grep -v "is ignored: it is neither" >&2)
size=$(du -sm "$stage" | cut -f1)
if [ "$size" -gt "$limit_mib" ]; then
  echo "error: the wheels of bench/device/wheels.txt take ${size} MiB, over the ${limit_mib} MiB a device call can carry beside the tree" >&2
  exit 1
fi
rm -rf .whl
mv "$stage" .whl
trap - EXIT
echo ".whl: $(ls .whl | wc -l) wheels, ${size} MiB; carry it: run(command=\"bash bench/device/run.sh\", carry=[\".whl\"])"
