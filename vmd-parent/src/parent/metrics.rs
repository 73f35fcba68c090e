//! What `vmctl metrics` and the `metrics listen` socket serve: per VM
//! and daemon-wide counters, read when asked from where they live (the
//! VM table, the consoles, KVM's statistics fds, the TAPs' and disk
//! devices' counters).

use super::*;
use crate::metrics::{kvm_counters, netdev_counter, Exposition};
use vmd_proto::stats;

/// Every state a VM can be in, for the per-state series.
const STATES: [VmState; 6] = [
    VmState::Waiting,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Stopping,
    VmState::Stopped,
];

impl Parent {
    pub(super) fn metrics_text(&self) -> String {
        let mut e = Exposition::default();
        for state in STATES {
            let n = self.vms.vms.values().filter(|vm| vm.state == state).count();
            let s = state.to_string();
            e.gauge(
                "vmd_vms",
                "VMs vmd knows, by state.",
                &[("state", &s)],
                n as f64,
            );
        }
        e.gauge(
            "vmd_control_clients",
            "vmctl clients connected to the control socket.",
            &[],
            f64::from(self.control_clients),
        );
        e.counter(
            "vmd_reloads_total",
            "Successful configuration reloads (SIGHUP, vmctl reload).",
            &[],
            self.reloads,
        );
        for vm in self.vms.vms.values() {
            self.vm_metrics(&mut e, vm);
        }
        e.render()
    }

    fn vm_metrics(&self, e: &mut Exposition, vm: &Vm) {
        let id = vm.id.to_string();
        let l = [("vm", vm.name.as_str()), ("id", id.as_str())];
        for state in STATES {
            let s = state.to_string();
            let labels = [l[0], l[1], ("state", s.as_str())];
            let v = if vm.state == state { 1.0 } else { 0.0 };
            e.gauge("vmd_vm_state", "1 for the state the VM is in.", &labels, v);
        }
        let p = vm.proc.as_ref();
        let uptime = p
            .and_then(|p| p.running_since)
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        e.gauge(
            "vmd_vm_uptime_seconds",
            "Seconds since the VM's guest started running (0 when not running).",
            &l,
            uptime,
        );
        e.gauge(
            "vmd_vm_vcpus",
            "Virtual CPUs.",
            &l,
            f64::from(vm.spec.vcpus),
        );
        e.gauge(
            "vmd_vm_memory_bytes",
            "Guest memory configured.",
            &l,
            vm.spec.memory as f64,
        );
        e.counter(
            "vmd_vm_restarts_total",
            "Restarts after guest reboots.",
            &l,
            u64::from(vm.restarts),
        );
        e.counter(
            "vmd_vm_console_output_bytes_total",
            "Bytes the guest wrote to its serial console.",
            &l,
            vm.console.bytes_out,
        );
        e.counter(
            "vmd_vm_console_input_bytes_total",
            "Bytes typed into the guest's serial console.",
            &l,
            vm.console.bytes_in,
        );
        let Some(p) = p else { return };
        // KVM's per-vCPU counters, summed over the vCPUs.
        let mut exits: BTreeMap<String, u64> = BTreeMap::new();
        for fd in &p.kvm_stats {
            for (name, v) in kvm_counters(fd) {
                *exits.entry(name).or_default() += v;
            }
        }
        if let Some(all) = exits.get("exits") {
            e.counter(
                "vmd_vm_vcpu_exits_total",
                "vCPU exits to KVM, all reasons (KVM's exits counter).",
                &l,
                *all,
            );
        }
        for (name, v) in &exits {
            if let Some(reason) = name.strip_suffix("_exits") {
                let labels = [l[0], l[1], ("reason", reason)];
                e.counter(
                    "vmd_vm_vcpu_exits_by_reason_total",
                    "vCPU exits to KVM by reason (KVM's io_exits, mmio_exits, halt_exits, ...).",
                    &labels,
                    *v,
                );
            }
        }
        for dev in &p.devices {
            let Some(c) = &dev.disk_stats else { continue };
            let labels = [l[0], l[1], ("disk", dev.name.as_str())];
            e.counter(
                "vmd_vm_disk_read_requests_total",
                "Read requests the disk's device served.",
                &labels,
                c.get(stats::DISK_READ_REQUESTS),
            );
            e.counter(
                "vmd_vm_disk_read_bytes_total",
                "Bytes the disk's device read for the guest.",
                &labels,
                c.get(stats::DISK_READ_BYTES),
            );
            e.counter(
                "vmd_vm_disk_write_requests_total",
                "Write requests the disk's device served.",
                &labels,
                c.get(stats::DISK_WRITE_REQUESTS),
            );
            e.counter(
                "vmd_vm_disk_write_bytes_total",
                "Bytes the disk's device wrote for the guest.",
                &labels,
                c.get(stats::DISK_WRITE_BYTES),
            );
        }
        // The guest's receive is its TAP's transmit, and the other way.
        for (index, tap) in p.taps.iter().enumerate() {
            let nic = format!("net{index}");
            let labels = [
                l[0],
                l[1],
                ("nic", nic.as_str()),
                ("interface", tap.as_str()),
            ];
            for (name, help, counter) in [
                (
                    "vmd_vm_nic_rx_packets_total",
                    "Packets the guest received.",
                    "tx_packets",
                ),
                (
                    "vmd_vm_nic_rx_bytes_total",
                    "Bytes the guest received.",
                    "tx_bytes",
                ),
                (
                    "vmd_vm_nic_rx_dropped_total",
                    "Packets for the guest the host dropped.",
                    "tx_dropped",
                ),
                (
                    "vmd_vm_nic_tx_packets_total",
                    "Packets the guest sent.",
                    "rx_packets",
                ),
                (
                    "vmd_vm_nic_tx_bytes_total",
                    "Bytes the guest sent.",
                    "rx_bytes",
                ),
                (
                    "vmd_vm_nic_tx_dropped_total",
                    "Packets from the guest the host dropped.",
                    "rx_dropped",
                ),
            ] {
                e.counter(name, help, &labels, netdev_counter(tap, counter));
            }
        }
    }
}
