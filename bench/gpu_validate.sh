#!/usr/bin/env bash
# Everything that needs a real GPU, in one run (docs/gpu-validation.md): install the carried
# wheels, build pycuda in the background, run tests/gpu, then the GPU benchmarks (the fleet one
# where there are two GPUs or more).
# Usage on the GPU machine, from the repository root, with .whl/ from ../shared/tools/device-wheels.sh:
#   OUT=/some/dir bash bench/gpu_validate.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/exporter:$PWD/tests
(CUDA_ROOT=/usr/local/cuda python3 -m pip install -q --no-index --no-deps --no-build-isolation \
   --target /tmp/pycuda .whl/sdist/pycuda-*.tar.gz >"$OUT/pycuda-build.log" 2>&1
 echo $? >/tmp/pycuda.rc) &
{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap,mig.mode.current --format=csv
  python3 -c 'import sys, numpy, cuda.bindings, pynvml; print(sys.version); print("numpy", numpy.__version__); print("cuda-bindings", cuda.bindings.__version__); print("nvidia-ml-py", getattr(pynvml, "__version__", "?"))'
  python3 -c 'import tensorrt_lean_bindings as t; print("tensorrt_lean", t.__version__)'
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu -k "not pycuda" 2>&1 | tee "$OUT/gpu-tests.log"
wait
echo "pycuda build rc=$(cat /tmp/pycuda.rc)"
export PYTHONPATH=$PYTHONPATH:/tmp/pycuda
python3 -m pytest -q -p no:cacheprovider tests/gpu -k pycuda 2>&1 | tee "$OUT/gpu-tests-pycuda.log"
python3 bench/bench_gpu.py --probes 3000 --json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log"
if [ "$(nvidia-smi --list-gpus | wc -l)" -ge 2 ]; then
  python3 bench/bench_fleet.py --json "$OUT/bench-fleet.json" 2>&1 | tee "$OUT/bench-fleet.log"
fi
