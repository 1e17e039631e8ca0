#!/bin/busybox sh
# PID 1 of the test VM (`cargo xtask test --kernels`): mounts what the agent and the tests
# expect, runs each test binary, prints markers the host parses, and powers off. The host
# counts a run only if it sees MESH-VM-DONE; a hang or panic is a failure, never a pass.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t bpf bpffs /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
# The L7 tests hold thousands of sockets at once.
ulimit -n 65536

echo "MESH-VM-KERNEL $(uname -r)"
# Modules Debian builds as such (xtask's fetch.rs MODULES), in load order: socket diagnostics.
for module in inet_diag tcp_diag; do
    file=/lib/modules/$(uname -r)/$module.ko
    [ -f "$file" ] && { insmod "$file" || echo "MESH-VM-NOTE insmod $module failed"; }
done
# The host's first boot only asks whether this accelerator works.
if grep -qw mesh.probe /proc/cmdline; then poweroff -f; fi
export MESH_BIN=/bin/mesh MESH_PROBE_BIN=/bin/mesh-probe RUST_BACKTRACE=1
for test in /tests/*; do
    echo "MESH-VM-BEGIN ${test##*/}"
    # --show-output: a test that skips prints "SKIP: reason"; the host reports it as skipped.
    "$test" --show-output
    echo "MESH-VM-END ${test##*/} rc=$?"
done
echo "MESH-VM-DONE"
poweroff -f
