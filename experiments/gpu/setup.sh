# Source on the GPU machine (device tool): installs the carried wheels (.whl/, see README "GPU runs")
# into /tmp/site and puts them and this checkout on PYTHONPATH; prints the versions of the run.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
python3 - <<'PY'
import datetime, torch, triton, diffusers, transformers
print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | gpu {torch.cuda.get_device_name()} | "
      f"torch {torch.__version__} | cuda {torch.version.cuda} | triton {triton.__version__} | "
      f"diffusers {diffusers.__version__} | transformers {transformers.__version__}")
PY
