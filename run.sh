#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11):
#   ./run.sh demo    set up, then run the whole DVC pipeline on the built-in synthetic data (tiny model)
#   ./run.sh test    set up, then run the test suite
#   ./run.sh setup   only set up (virtual environment .venv with requirements.txt, DVC analytics off)
#   ./run.sh app     set up, then start the web app on http://localhost:8501
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  # reinstall only when requirements.txt changed since the last install
  local stamp=.venv/.requirements.sha256
  local want; want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt
    echo "$want" > "$stamp"
  fi
  export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 TF_CPP_MIN_LOG_LEVEL=2
}

browser() {
  # the end-to-end app test drives Debian's Chromium; install it where missing and we may
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
    else
      echo "chromium not installed and cannot install it here: the browser test will skip" >&2
    fi
  fi
}

case "${1:-demo}" in
  setup) setup ;;
  demo)
    setup
    # the demo is a DVC experiment: synthetic data, the tiny 'demo' profile; results land in the workspace
    dvc exp run -S data.source=synthetic -S profile=demo
    dvc metrics show
    ;;
  test)
    setup
    browser
    shift || true
    # pytest-xdist: one worker per core, at most 4 (each holds its own TensorFlow), or BRAINSEG_TEST_WORKERS
    # (0: the tests in this process); worksteal hands a worker that finishes the tail of another's queue
    workers=(-n auto --maxprocesses 4)
    [ -n "${BRAINSEG_TEST_WORKERS:-}" ] && workers=(-n "$BRAINSEG_TEST_WORKERS")
    python -m pytest -q "${workers[@]}" --dist worksteal "$@"
    ;;
  app)
    setup
    streamlit run app/streamlit_app.py --server.headless true --server.maxUploadSize 10
    ;;
  *) echo "usage: $0 [demo|test|setup|app]" >&2; exit 2 ;;
esac
