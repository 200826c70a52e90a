#!/usr/bin/env bash
# The CPU image, tested as a user would use it (README, "The container image"):
#   1. build it: scripts/build_image.sh --cpu (its base is made the first time, then reused);
#   2. `srpo-train --help` in it;
#   3. the tiny CPU run in one container with networking off: 3 steps, a checkpoint, the HF export;
#   4. two containers as two nodes (host network, rendezvous on 127.0.0.1, one trainer process each,
#      model.tp=1, so the nodes are data-parallel) through examples/torchrun_multinode.sh: 2 steps
#      of the tiny run, then the same command to step 4, resuming from the step-2 checkpoint.
# Each step says what it does and runs under a time limit. The last line is the summary:
# "test_image: PASSED (...)", exit status 0; "test_image: FAILED at <step>: <why> (...)", 1;
# "test_image: SKIPPED (<why>)", 77, where this machine cannot build images (no podman and not
# root, or podman could not be installed). Files: outputs/test_image/ (the logs are kept; the runs'
# outputs only after a failure).
set -euo pipefail
cd "$(dirname "$0")/.."

image=localhost/srpo-megatron:cpu
work="$PWD/outputs/test_image"
logs="$work/logs"
runs="$work/outputs"       # every container's outputs/ (":z": shared, should SELinux label mounts)
mount=(--volume "$runs:/workspace/srpo_megatron/outputs:z")
containers=(srpo-test-tiny srpo-test-node0 srpo-test-node1)
# Time limits in seconds, several times what each took on 2 cores (README, "The container image"):
# a first build 7 min, the tiny run 3-4 min, each two-node run under 70 s.
build_limit=3600 tiny_limit=1200 nodes_limit=420

step="checking the machine"
started=$SECONDS

say() { echo "test_image [$(date +%T)]: $*"; }
skip() { echo "test_image: SKIPPED ($*)"; exit 77; }
fail() { why="$*"; exit 1; }
why=""

finish() {
  local rc=$?
  if command -v podman >/dev/null; then
    podman rm --force --ignore --time 0 "${containers[@]}" >/dev/null
  fi
  ((rc == 0 || rc == 77)) && return  # both printed their summary
  echo "test_image: FAILED at $step: ${why:-exit status $rc} (logs: ${logs#"$PWD"/}/)"
}
trap finish EXIT

# Runs a command under a time limit ($1 s), its output to the log $2 and, indented, to the terminal.
# A container whose pid 1 ignores SIGTERM outlives `timeout`'s TERM; its KILL 30 s later ends podman,
# and the exit trap removes the container.
limited() {
  local limit="$1" log="$2" rc=0 t=$SECONDS
  shift 2
  timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$log" | sed -u 's/^/    | /' || rc=$?
  ((rc == 0 || SECONDS - t < limit)) || fail "timed out after $limit s (exit status $rc; ${log##*/})"
  ((rc == 0)) || fail "exit status $rc (${log##*/})"
}

# One node of the two-node run, in the background: $1 node rank, $2 total steps, $3 log.
start_node() {
  # Host names of their own, resolving to addresses of their own: torchrun tells nodes apart by the
  # name their address resolves back to and by process id, and two containers on one host share its
  # name and both run torchrun as pid 1 (the rendezvous then waits for a second node, 10 minutes).
  timeout --kill-after=30 "$nodes_limit" podman run --rm --name "srpo-test-node$1" --network host \
    --hostname "node$1" --add-host node0:127.0.0.10 --add-host node1:127.0.0.11 \
    -e MASTER_ADDR=127.0.0.1 -e MASTER_PORT="$port" -e NNODES=2 -e NODE_RANK="$1" -e GPUS_PER_NODE=1 \
    -e OMP_NUM_THREADS=1 "${mount[@]}" "$image" \
    bash examples/torchrun_multinode.sh configs/tiny_cpu.yaml model.tp=1 train.total_steps="$2" \
    log.run_name=tiny_two_nodes >"$3" 2>&1
}

# Both nodes to step $1, logs $logs/$2.node{0,1}.log; node 0 (global rank 0, which prints the run)
# is shown as it goes.
two_nodes() {
  local steps="$1" name="$2" pid0 pid1 rc0=0 rc1=0 t=$SECONDS
  port=""
  for candidate in $(shuf -i 20000-29999 -n 20); do  # one nothing listens on
    (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null || { port="$candidate"; break; }
  done
  [[ -n "$port" ]] || fail "no free port for the rendezvous"
  : >"$logs/$name.node0.log"
  start_node 0 "$steps" "$logs/$name.node0.log" & pid0=$!
  start_node 1 "$steps" "$logs/$name.node1.log" & pid1=$!
  tail -n +1 -f --pid="$pid0" "$logs/$name.node0.log" | sed -u 's/^/    node0| /' &
  wait "$pid0" || rc0=$?
  wait "$pid1" || rc1=$?
  wait  # the follower of node 0's log
  if ((rc0 != 0 || rc1 != 0)); then
    echo "    last lines of node 1:"; tail -n 20 "$logs/$name.node1.log" | sed 's/^/    node1| /'
    local said="node 0 exit status $rc0, node 1 exit status $rc1; $name.node{0,1}.log"
    ((SECONDS - t < nodes_limit)) || fail "timed out after $nodes_limit s ($said)"
    fail "$said"
  fi
}

steps_in() {  # the steps metrics.jsonl of run $1 holds, in order
  grep -o '"step": [0-9]*' "$runs/$1/metrics.jsonl" | awk '{printf "%s%s", sep, $2; sep=" "}'
}

if ! command -v podman >/dev/null && [[ $EUID != 0 ]]; then
  skip "podman is not installed, and installing it needs root"
fi
if command -v podman >/dev/null; then  # an interrupted earlier run's
  podman rm --force --ignore --time 0 "${containers[@]}" >/dev/null
fi
rm -rf "$work"
mkdir -p "$logs" "$runs"

step="building the image"
say "$step: scripts/build_image.sh --cpu (the first time about 7 minutes and 35 GB of free disk, then seconds; limit $build_limit s)"
t=$SECONDS
rc=0
timeout --kill-after=30 "$build_limit" bash scripts/build_image.sh --cpu 2>&1 | tee "$logs/build.log" | sed -u 's/^/    | /' || rc=$?
((rc != 77)) || skip "$(grep -o 'cannot build here: .*' "$logs/build.log" | tail -n 1)"
build_s=$((SECONDS - t))
((rc == 0 || build_s < build_limit)) || fail "timed out after $build_limit s (exit status $rc; build.log)"
((rc == 0)) || fail "exit status $rc (build.log)"
size="$(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.1f GB", $1 / 1e9}')"

step="srpo-train --help"
say "$step in the image"
limited 120 "$logs/help.log" podman run --rm --network none "$image" srpo-train --help
grep -q "usage: srpo-train" "$logs/help.log" || fail "no usage line in its output"

step="the tiny run in one container"
say "$step, networking off: examples/run_tiny_cpu.sh train.total_steps=3 (makes the tiny model first: 3-4 minutes in all; limit $tiny_limit s)"
t=$SECONDS
limited "$tiny_limit" "$logs/tiny.log" podman run --rm --name srpo-test-tiny --network none "${mount[@]}" "$image" \
  bash examples/run_tiny_cpu.sh train.total_steps=3
tiny_s=$((SECONDS - t))
[[ -d "$runs/tiny_cpu_srpo/checkpoints/step_000003" ]] || fail "no checkpoint step_000003"
if [[ ! -f "$runs/tiny_cpu_srpo/hf/config.json" ]] || ! compgen -G "$runs/tiny_cpu_srpo/hf/*.safetensors" >/dev/null; then
  fail "no HF export in outputs/tiny_cpu_srpo/hf"
fi
[[ "$(steps_in tiny_cpu_srpo)" == "1 2 3" ]] || fail "metrics.jsonl holds steps '$(steps_in tiny_cpu_srpo)', not 1 2 3"

step="two containers as two nodes"
say "$step: examples/torchrun_multinode.sh, 1 process each, model.tp=1 (data-parallel), 2 steps (about 70 s; limit $nodes_limit s)"
t=$SECONDS
two_nodes 2 two_nodes
nodes_s=$((SECONDS - t))
grep -q "dp 2" "$logs/two_nodes.node0.log" || fail "the run's layout is not data-parallel over the two nodes"
[[ -d "$runs/tiny_two_nodes/checkpoints/step_000002" ]] || fail "no checkpoint step_000002"
[[ "$(steps_in tiny_two_nodes)" == "1 2" ]] || fail "metrics.jsonl holds steps '$(steps_in tiny_two_nodes)', not 1 2"

step="the two-node resume"
say "$step: the same command to step 4, from the step-2 checkpoint (about 70 s; limit $nodes_limit s)"
t=$SECONDS
two_nodes 4 resume
resume_s=$((SECONDS - t))
grep -q "resumes after step 2" "$logs/resume.node0.log" || fail "the run did not say it resumes after step 2"
[[ -d "$runs/tiny_two_nodes/checkpoints/step_000004" ]] || fail "no checkpoint step_000004"
[[ "$(steps_in tiny_two_nodes)" == "1 2 3 4" ]] || fail "metrics.jsonl holds steps '$(steps_in tiny_two_nodes)', not 1 2 3 4"

rm -rf "$runs"
total=$((SECONDS - started))
echo "test_image: PASSED ($image, $size: built in $build_s s; srpo-train --help; tiny run in one container," \
  "network off, 3 steps + checkpoint + HF export: $tiny_s s; two containers, DP=2, 2 steps: $nodes_s s," \
  "resumed to step 4: $resume_s s; total $((total / 60)) min $((total % 60)) s)"
