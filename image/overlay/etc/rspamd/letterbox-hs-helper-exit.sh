#!/bin/sh
# Letterbox (issue 16): end rspamd's hs_helper process once it has done its work, to save its memory
# (run in the background by rspamd.service's ExecStartPost, see
# /etc/systemd/system/rspamd.service.d/letterbox.conf).
#
# rspamd 3.4 always starts an hs_helper next to its workers (src/rspamd.c spawn_workers: the worker is
# RSPAMD_WORKER_ALWAYS_START, and one disabled in the configuration is started all the same). It compiles
# rspamd's regular expressions into Hyperscan databases in rspamd's DBDIR, tells the workers to load them,
# then only wakes every minute to look for regular expressions that changed at run time (maps of
# regular expressions that were updated). Forked from the main process, it costs about 40 MB of RSS (14 MB of
# PSS) for the rest of rspamd's life (bench/spam.py). Once a worker has mapped the compiled databases
# and hs_helper has used no CPU for 5 seconds (compiling is all CPU; rspamd's main process loads a
# cache left by an earlier start before hs_helper has checked it), this sends it SIGTERM: it exits with
# status 0, which rspamd's main process takes for a normal end and does not respawn
# (src/libserver/worker_util.c rspamd_check_termination_clause). One killed before it set its signal
# handlers is respawned 2 s later: this waits 5 s to see none come back, and ends a new one the same way.
# A restart starts hs_helper again (and this with it); so does a reload (SIGHUP), and rspamd.service's
# ExecReload starts this again as well. Without Hyperscan there is no hs_helper, and this ends after 30 s.
#
# Usage: letterbox-hs-helper-exit.sh MAINPID [SECONDS]   (give up after SECONDS, default 900)
set -u
main=${1:?usage: $0 MAINPID [SECONDS]}
patience=${2:-900}

children() {
    cat "/proc/$main/task/$main/children" 2>/dev/null
}

title() {
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null
}

cpu() {  # utime + stime (the process title is rewritten; its comm, field 2, has no spaces)
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null
}

waited=0
idle=0
last=""
killed=0
gone=0
while [ "$waited" -lt "$patience" ]; do
    [ -d "/proc/$main" ] || exit 0
    helper=""
    loaded=""
    workers=""
    for pid in $(children); do
        case "$(title "$pid")" in
            "rspamd: hs_helper"*) helper=$pid ;;
            # A worker maps each compiled database (DBDIR/*.hs, loaded from *.hs.unser).
            *) workers=$pid
               grep -q '\.hs\(\.unser\)\?$' "/proc/$pid/maps" 2>/dev/null && loaded=$pid ;;
        esac
    done
    if [ -z "$helper" ]; then
        [ -n "$workers" ] && gone=$((gone + 1))
        # Ended, and not started again: rspamd's main process respawns a worker 2 s after it died by a
        # signal (one caught before it set its handlers: then the next round ends the new one).
        [ "$killed" -eq 1 ] && [ "$gone" -ge 5 ] && exit 0
        # Never any: rspamd without Hyperscan.
        [ "$gone" -ge 30 ] && exit 0
    else
        gone=0
        now="$helper:$(cpu "$helper")"
        if [ "$now" = "$last" ]; then idle=$((idle + 1)); else idle=0; fi
        last=$now
        # hs_helper tells the workers a second after it compiled (src/hs_helper.c); 5 idle seconds
        # leave them time to load it.
        if [ -n "$loaded" ] && [ "$idle" -ge 5 ]; then
            kill -TERM "$helper" 2>/dev/null
            killed=1
            idle=0
        fi
    fi
    sleep 1
    waited=$((waited + 1))
done
exit 0
