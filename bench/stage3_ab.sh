#!/usr/bin/env bash
# Stage 3's wall time under an older commit and this checkout, over one work folder's earlier stages (autoencoder,
# text, teacher, cache, init), run alone in the order old, new, new, old so drift in this shared machine's speed
# falls on both sides. Prints each run's stage-3 seconds and whether its metrics.csv equals the first run's (a
# speed change that should not change the training must leave every logged loss bit-identical).
#   bash bench/stage3_ab.sh BASE_WORK OLD_COMMIT [PHASE_STEPS]     e.g. ... W a0f3bd0 '[100,50,50,50]'
set -euo pipefail
base=$(realpath "$1"); old=$2; phases=${3:-[100,50,50,50]}
here=$(git rev-parse --show-toplevel); py=$here/.venv/bin/python
tmp=$(mktemp -d); trap 'git -C "$here" worktree remove --force "$tmp/old" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$here" worktree add -f --detach "$tmp/old" "$old" >/dev/null 2>&1
first=""
for run in old1 new1 new2 old2; do
  case $run in old*) src=$tmp/old ;; *) src=$here ;; esac
  mkdir -p "$tmp/$run"
  for d in autoencoder text teacher cache init; do cp -al "$base/$d" "$tmp/$run/$d"; done
  # python -m from the checkout's root imports that checkout's trainer, not the editable install's
  (cd "$src" && "$py" -m trainer --recipe shapes16 --work "$tmp/$run" --stage nitro --set "nitro.phase_steps=$phases" \
     > "$tmp/$run.log" 2>&1)
  secs=$(tail -n 1 "$tmp/$run/stage_times.csv" | cut -d, -f3)
  cut -d, -f1,3- "$tmp/$run/nitro/metrics.csv" > "$tmp/$run.losses"  # every column but the wall time
  first=${first:-$tmp/$run.losses}
  same=$(cmp -s "$first" "$tmp/$run.losses" && echo yes || echo NO)
  echo "$run ($(git -C "$src" rev-parse --short HEAD)): stage 3 ${secs} s; losses identical to old1: $same"
done
