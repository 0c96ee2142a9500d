#!/usr/bin/env bash
# One entry point that sets itself up:
#   bash run.sh demo [train_kd.py options]   the main job: teacher vs independent vs KD student
#   bash run.sh test [pytest options]        the test suite (what CI runs)
#   bash run.sh setup                        only create .venv and prepare the data
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
DATA_DIR=${DATA_DIR:-./data}
SHARED_DATA=../shared/data

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    # pip is quick when everything is already installed
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt
    # machines without a network carry a CIFAR-10 copy next to the repo; use it if present
    if [ ! -f "$DATA_DIR/cifar-10-batches-py/test_batch" ] && [ -f "$SHARED_DATA/prepare_cifar10.py" ]; then
        "$VENV/bin/python" "$SHARED_DATA/prepare_cifar10.py" "$DATA_DIR"
    fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    demo)
        setup
        "$VENV/bin/python" train_kd.py --demo --profile cpu --data-dir "$DATA_DIR" --download "$@"
        ;;
    test)
        setup
        # one worker per core, one thread each (tests/conftest.py); an idle worker takes queued tests from
        # the other (worksteal); pass -n 0 to run in this process
        "$VENV/bin/python" -m pytest -q -n auto --dist worksteal "$@"
        ;;
    *)
        sed -n '2,5p' "$0"
        exit 2
        ;;
esac
