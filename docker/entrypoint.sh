#!/bin/bash
# Container entrypoint.  Arguments that start with an mpitrain command go to
# `mpitrain`; anything else runs as given (bash, mpiexec, sshd ...).
#   (no arguments)                     mpitrain run -n 2 jobs/digits.toml   (the image's CMD)
#   run -n 4 jobs/regression.toml ...  mpitrain run -n 4 jobs/regression.toml ...
#   mpiexec -n 2 python -m mpitrain run jobs/digits.toml
# An empty first argument trains the digits job on MT_NP ranks (default 2).  Not an MPITRAIN_
# name: mpitrain takes those for job settings, MPITRAIN_<SECTION>_<KEY>, and refuses others.
set -e
case "${1:-}" in
  run|explain|diagnose|bench|simulate|-h|--help) exec mpitrain "$@" ;;
  "") exec mpitrain run -n "${MT_NP:-2}" jobs/digits.toml ;;
  *) exec "$@" ;;
esac
