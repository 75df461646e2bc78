#!/bin/sh
# Letterbox (issue 16): end rspamd's hs_helper process as soon as it can end cleanly, to save its memory
# (run in the background by rspamd.service's ExecStartPost and ExecReload, see
# /etc/systemd/system/rspamd.service.d/letterbox.conf).
#
# rspamd 3.4 always starts an hs_helper next to its workers, at every start and every reload (SIGHUP):
# src/rspamd.c spawn_workers starts a worker flagged RSPAMD_WORKER_ALWAYS_START even when its section
# is disabled or has count = 0. Its only job is compiling rspamd's regular expressions into Hyperscan
# databases. The box does not use them (rspamd.conf.local: disable_hyperscan, and hs_helper's cache_dir
# is a path that cannot exist, so it compiles nothing even before this ends it), yet, forked from
# rspamd's main process, it counts the main process's memory in its own RSS: 20-35 MB summed with the
# others for as long as it lives (bench/spam.py).
#
# It is ended once it has set its SIGTERM handler (bit 15 of SigCgt in /proc/PID/status): it then exits
# with status 0, which rspamd's main process takes for a normal end and does not respawn
# (src/libserver/worker_util.c rspamd_check_termination_clause). One killed by the signal itself, before
# its handler was set, would be respawned 2 s later: waiting for the handler avoids that, and this
# watches 3 s more after the end to end a new one the same way.
#
# Usage: letterbox-hs-helper-exit.sh MAINPID [SECONDS]   (give up after SECONDS, default 900)
set -u
main=${1:?usage: $0 MAINPID [SECONDS]}
patience=${2:-900}

# Shell builtins only (read, case, arithmetic; results in variables, as a $(...) would fork too):
# hs_helper lives until this sees it, and on a loaded machine every process started here delays that.
read_children() {  # into $kids
    kids=""
    read -r kids 2>/dev/null <"/proc/$main/task/$main/children"
}

read_title() {  # into $title: the title up to its first NUL, "rspamd: hs_helper process"
    title=""
    IFS= read -r title 2>/dev/null <"/proc/$1/cmdline"
}

handles_term() {  # SIGTERM (15) is bit 14 of the caught-signals mask: 0x4000 in its last four digits
    mask=""
    while IFS=: read -r key value; do
        [ "$key" = SigCgt ] && mask=${value##*[[:space:]]} && break
    done 2>/dev/null <"/proc/$1/status"
    [ -n "$mask" ] && [ $(( 0x${mask#"${mask%????}"} & 0x4000 )) -ne 0 ]
}

# Debian builds rspamd with Hyperscan, and so with an hs_helper, on x86 only (the Pi's arm64 rspamd has
# neither): nothing to wait for elsewhere.
case "$(uname -m)" in
    x86_64 | i?86) ;;
    *) exit 0 ;;
esac

# Ticks of 0.1 s: rspamd's main process forks its workers and hs_helper only once it has loaded its
# rules (minutes on a slow machine), so this looks twice a second until it has children, then every tick.
ticks=0
gone=0
killed=0
while [ "$ticks" -lt $((patience * 10)) ]; do
    [ -d "/proc/$main" ] || exit 0
    helper=""
    workers=""
    read_children
    for pid in $kids; do
        read_title "$pid"
        case "$title" in
            "rspamd: hs_helper"*) helper=$pid ;;
            *) workers=$pid ;;
        esac
    done
    if [ -n "$helper" ]; then
        gone=0
        if handles_term "$helper"; then
            kill -TERM "$helper" 2>/dev/null
            killed=1
        fi
    elif [ "$killed" -eq 1 ]; then
        # Ended, and not started again within 3 s.
        gone=$((gone + 1))
        [ "$gone" -ge 30 ] && exit 0
    fi
    if [ -n "$helper$workers" ]; then
        sleep 0.1
        ticks=$((ticks + 1))
    else
        sleep 0.5
        ticks=$((ticks + 5))
    fi
done
exit 0
