# There (sourced by run.sh): the carried wheels (.whl/) installed into $DEVICE_SITE (default /tmp/site) and put
# before the image's packages on PYTHONPATH, with the repository itself; prints the versions that will run.
device_site=${DEVICE_SITE:-/tmp/site}
if ! ls .whl/*.whl > /dev/null 2>&1; then
  echo "error: no .whl/ here: run bench/device/fetch_wheels.sh on the development machine and carry .whl" >&2
  return 1
fi
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$device_site" .whl/*.whl || return 1
export PYTHONPATH="$device_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "
import platform, numpy, torch, composer, streaming, transformers, llmshearing.train
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print(f'python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, '
      f'composer {composer.__version__}, streaming {streaming.__version__}, transformers {transformers.__version__}; {cuda}')
" || return 1
