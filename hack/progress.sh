# Progress lines for the hack/ build scripts, which source this file after defining their `log`
# (one line to stderr with the script's prefix):
#
#   steps=N                       how many steps this run will take (the cached ones are not counted)
#   step "what (how long)"        one line before a step starts:  control-plane: [3/5] what (how long)
#   ticking "what" COMMAND...     runs COMMAND in the foreground (Ctrl-C reaches it), saying every 30 s
#                                 that it is still at it, for steps whose own output is quiet for
#                                 minutes (a Go build, debootstrap, buildah --quiet). Under `set -e` a
#                                 failing COMMAND ends the script as it would without ticking; in a
#                                 condition (`ticking ... || die`) its status is ticking's.
#
# The ticker stops with COMMAND, or within a second of the script's end however it ends (it checks
# that the script is still there), so that a caller reading the script's stderr to its end is not kept
# waiting: its sleeps hold none of the script's output open.
# shellcheck shell=bash

step_n=0
steps=${steps:-0}

step() {
  step_n=$((step_n + 1))
  log "[$step_n/$steps] $*"
}

ticking() { # WHAT COMMAND...
  local what=$1 began ticker
  shift
  began=$(date +%s)
  (
    n=0
    while kill -0 "$$" 2>/dev/null; do # $$ is the script's pid in this subshell too
      sleep 1 </dev/null >/dev/null 2>&1
      n=$((n + 1))
      if [ $((n % 30)) -eq 0 ] && kill -0 "$$" 2>/dev/null; then
        t=$(($(date +%s) - began))
        log "... still $what: $((t / 60)) min $((t % 60)) s so far"
      fi
    done
  ) &
  ticker=$!
  "$@"
  local status=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$status"
}
