# Sourced by quickstart.sh and test.sh before they create ./.venv: pip's default torch on x86_64
# Linux is the CUDA build, and the venv then takes ~6 GB. Warn (pip may still fit) rather than
# let a full disk surface as pip's "No space left on device" halfway through.
if [ ! -x .venv/bin/python ]; then
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((7 * 1024 * 1024)) ]; then
    echo "warning: $((free_kb / 1024 / 1024)) GB free in $PWD; the venv needs ~6 GB (torch's CUDA build):" \
         "free some space if pip fails with 'No space left on device'" >&2
  fi
fi
