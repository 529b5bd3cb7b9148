# Shell pieces shared by the studies' device scripts (experiments/smollm2/gpu.sh, experiments/multiplication/gpu.sh):
# a driver started on a device machine in one call keeps running between calls of the same lease, and every later
# call looks at it and brings back what it has. Sourced, never run:
#   source "$(dirname "${BASH_SOURCE[0]}")/../devicekit.sh"
# Here (the repository root):   dk_ignore_carry, dk_revision FILE
# On the device (ROOT: the study's folder outside the tree, e.g. /root/mult; it survives between calls):
#   dk_freeze_source ROOT DRIVER   the tree's src/kava, the driver and devicekit.py, copied to ROOT/src, ROOT/driver.py, ROOT/
#   dk_device_info                 the GPU, its memory and driver; torch, transformers, peft, accelerate
#   dk_mps_start ROOT [N] [PROBE]  the CUDA MPS daemon, kept only if N concurrent PROBE clients succeed
#   dk_mps_env ROOT                the MPS pipe and log folders of ROOT, for a later call's jobs
#   dk_detach LOG CMD...           CMD under setsid nohup, detached from the call (it outlives the call)
#   dk_wait_done LOG SECONDS       until LOG has the driver's "all done" line, or SECONDS have passed
#   dk_pack ROOT VERB              ROOT/driver.py VERB --out ROOT/out --tar $OUT/results.tgz (no weights)
# Large files travel in pieces with experiments/devicekit.py (split, stash, join).

# .carry/ must never travel as untracked files, nor be committed; a worktree has no .git/info of its own
dk_ignore_carry() {
  local ex
  ex=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$ex")" && \
    { grep -qx '/.carry/' "$ex" 2>/dev/null || echo '/.carry/' >> "$ex"; }
}

# the revision the device will run, and what differs from it: the results' record
dk_revision() {
  { git rev-parse HEAD; git status --short; } > "$1"
}

# the jobs run from this copy, so that a later call's tree copy cannot change them
dk_freeze_source() {
  rm -rf "$1/src" && mkdir -p "$1/src" && cp -r src/kava "$1/src/" && cp "$2" "$1/driver.py" && \
    cp experiments/devicekit.py "$1/"
}

dk_device_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate
print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)"
}

dk_mps_env() {
  export CUDA_MPS_PIPE_DIRECTORY=$1/mps/pipe CUDA_MPS_LOG_DIRECTORY=$1/mps/log
}

# CUDA MPS lets many small jobs' kernels run side by side on the GPU instead of time-sliced. It is kept only if
# N clients (default 1) running PROBE (python3 -c; default a matmul) at once all succeed within DK_MPS_TIMEOUT s
# (default 60); their output is in ROOT/mps/client<i>.log. Prints "MPS: on", "MPS: off (test failed)" or "MPS: not
# available"; returns 0 only when on, with the MPS variables exported to this shell (call it outside $( ) and pipes).
dk_mps_start() {
  local root=$1 n=${2:-1} probe=${3:-} i ok=1
  [ -n "$probe" ] || probe="import torch; x = torch.randn(64, 64, device='cuda'); print(float((x @ x).sum()))"
  if ! command -v nvidia-cuda-mps-control >/dev/null; then echo "MPS: not available"; return 1; fi
  dk_mps_env "$root"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # the daemon must not hold this call's output open (a `| tail` on the call then waits for it until the limit)
  nvidia-cuda-mps-control -d >/dev/null 2>&1 </dev/null && sleep 2
  for i in $(seq "$n"); do
    (timeout "${DK_MPS_TIMEOUT:-60}" python3 -c "$probe" > "$root/mps/client$i.log" 2>&1
     echo $? >> "$root/mps/client$i.log") &
  done
  wait
  for i in $(seq "$n"); do
    cat "$root/mps/client$i.log"
    [ "$(tail -1 "$root/mps/client$i.log")" = 0 ] || ok=0
  done
  if [ "$ok" = 1 ]; then echo "MPS: on"; return 0; fi
  echo quit | nvidia-cuda-mps-control
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  echo "MPS: off (test failed)"
  return 1
}

# the driver outlives this call: its own session, no terminal, no open pipe to the call's output
dk_detach() {
  local log=$1
  shift
  setsid nohup "$@" > "$log" 2>&1 < /dev/null &
}

dk_wait_done() {
  local end=$(( $(date +%s) + ${2:-560} ))
  while [ "$(date +%s)" -lt "$end" ] && ! grep -q '"all done"' "$1" 2>/dev/null; do sleep "${DK_POLL_S:-10}"; done
}

# every call brings back what exists (a lease can end before the last call): ROOT's revision and driver.log go
# into ROOT/out, and the driver's VERB (multiplication: pack, smollm2: collect) packs the small files of ROOT/out
dk_pack() {
  : "${OUT:?set OUT to the folder that comes back}"
  cp "$1/revision" "$1/driver.log" "$1/out/" 2>/dev/null
  PYTHONPATH=$1/src python3 "$1/driver.py" "$2" --out "$1/out" --tar "$OUT/results.tgz"
}
