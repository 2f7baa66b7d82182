#!/usr/bin/env bash
# Fresh-process start-up times of a checkout: `import rnnc` and `rnnc compile lstm`, median of N runs.
# Usage: bash benchmarks/startup.sh [CHECKOUT] [N]   (CHECKOUT: default the repository root; N: default 9)
# The checkout's rnnc is put first on sys.path and site-packages added without running .pth files, so
# an editable install elsewhere is not what gets timed (export two commits with `git archive` to compare).
set -euo pipefail
ROOT=$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd)
N=${2:-9}
PY=${PYTHON:-python}
SITE=$("$PY" -c "import site; print(':'.join(site.getsitepackages()))")
PRE="import sys; sys.path[:0] = ['$ROOT'] + '$SITE'.split(':')"
export RNNC_CACHE_DIR=${RNNC_CACHE_DIR:-$(mktemp -d)}
cd "$(mktemp -d)"
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
run() { for _ in $(seq "$N"); do /usr/bin/time -f "%e" "$PY" -S -c "$PRE; $1" 2>&1 >/dev/null | tail -1; done | median; }
echo "import rnnc: $(run 'import rnnc') s"
echo "rnnc compile lstm: $(run "from rnnc.cli import main; sys.exit(main(['compile', 'lstm', '-o', 'x.py']))") s"
