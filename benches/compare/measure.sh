# Sourced by the side-by-side scripts: `measure CMD ARGS...` runs a command and prints
# `wall_s=... rss_mib=... wchar=... rc=...`: wall seconds, peak RSS (the kernel's accounting of the
# finished process), the bytes it passed to write calls (`wchar` of /proc/PID/io, read while the
# finished process is still a zombie, so nothing is missed) and its exit code.
measure() {
    python3 - "$@" <<'EOF'
import os, sys, time
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
wall = time.monotonic() - t0
io = dict(l.split(": ") for l in open(f"/proc/{pid}/io").read().splitlines())
_, status, ru = os.wait4(pid, 0)
print(f"wall_s={wall:.3f} rss_mib={ru.ru_maxrss / 1024:.0f} wchar={io['wchar']} "
      f"rc={os.waitstatus_to_exitcode(status)}")
EOF
}
