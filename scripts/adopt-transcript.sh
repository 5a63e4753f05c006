#!/bin/sh
# The README's LVM transcript ("Adopting the host's mirrors"), made for real in the VM:
#   ./scripts/kernel-vm run 'sh scripts/adopt-transcript.sh'
# LVM runs with its configuration in a scratch directory (shardlog/harness/kernelvm/lvm.py); the
# PVs are loop devices over the guest's tmpfs.  Lines starting with "# " are the commands.
export $(python -m shardlog.harness.kernelvm.lvm /tmp/lvm)
for i in 0 1 2; do truncate -s 128M /tmp/pv$i; losetup /dev/loop$i /tmp/pv$i; done
show() {  # the command, its output (without LVM's backup warning), its exit code kept
    echo "# $*"; "$@" >/tmp/out 2>&1; rc=$?; grep -v 'NOT backed up' /tmp/out; return $rc
}
quiet_until_synced() { while ! lvs --noheadings -o copy_percent "$1" | grep -q 100.00; do sleep 0.5; done; }
echo "--- transcript ---"
show vgcreate vg /dev/loop0 /dev/loop1 /dev/loop2
show lvcreate --type mirror -m1 --mirrorlog disk -L 64M -n data vg
show lvcreate --type mirror -m1 --mirrorlog core -L 16M -n scratch vg
quiet_until_synced vg/data; quiet_until_synced vg/scratch
show lvs -a -o lv_name,lv_attr,lv_size,mirror_log,copy_percent,devices vg
echo "# shardlog serve --workers 2 &"
shardlog serve --workers 2 --state-dir /tmp/state --metrics-addr '' --pid-file /tmp/shardlog.pid 2>/tmp/serve.log &
while [ ! -s /tmp/shardlog.pid ]; do sleep 0.2; done
show shardlog adopt --dry-run vg/data
show shardlog adopt --all
echo "(exit $?)"
show dmsetup table vg-data
show dmsetup status vg-data
show lvs -o lv_name,lv_attr,mirror_log,copy_percent,lv_health_status vg
echo "# fio --name=w --filename=/dev/vg/data --rw=randwrite --bs=4k --direct=1 --io_size=1M | grep -E 'err=|IOPS'"
fio --name=w --filename=/dev/vg/data --rw=randwrite --bs=4k --direct=1 --io_size=1M | grep -E 'err=|IOPS' 
show shardlog status
show shardlog adopt vg/scratch
echo "(exit $?)"
show lvextend -L +16M vg/data
show dmsetup table vg-data
show shardlog adopt vg/data
show shardlog release vg/data
show dmsetup status vg-data
show lvs -o lv_name,lv_attr,mirror_log,copy_percent vg
echo "--- end ---"
kill $(cat /tmp/shardlog.pid); wait
vgchange -an vg >/dev/null 2>&1
