#!/bin/bash
# Container entrypoint.  Arguments that start with an mpitrain command go to
# `mpitrain`; anything else runs as given (bash, mpiexec, sshd ...).
#   (no arguments)                     mpitrain run -n 2 jobs/digits.toml   (the image's CMD)
#   run -n 4 jobs/regression.toml ...  mpitrain run -n 4 jobs/regression.toml ...
#   mpiexec -n 2 python -m mpitrain run jobs/digits.toml
set -e
case "${1:-}" in
  run|explain|diagnose|bench|trace|-h|--help|--version) exec mpitrain "$@" ;;
  "") exec mpitrain run -n "${MPITRAIN_NP:-2}" jobs/digits.toml ;;
  *) exec "$@" ;;
esac
