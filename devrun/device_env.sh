# Sourced by the devrun/s11call*.sh scripts on the device machine: an output folder W under $OUT (packed into one
# archive at the end: 8 files come back at most), the package's pure-Python dependencies the image lacks (pydantic
# and its own, carried as wheels in .whl: `carry: [".whl"]`; the image has no network), then the package itself.
W=$OUT/w; mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "wheel install failed"
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
