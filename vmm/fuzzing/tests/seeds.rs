//! Writes the seed inputs of every target into `corpus/TARGET/seed-*`:
//! the requests, register sequences and saved states the unit tests use,
//! in each target's input format. Run by hand when a format changes:
//! `cargo test -p fuzzing --test seeds -- --ignored`, then minimize with
//! `scripts/fuzz cmin TARGET`.

use std::path::PathBuf;

use fuzzing::mem::LOW_LEN;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

/// A guest memory image with descriptors and buffers placed by hand.
struct Image(Vec<u8>);

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

impl Image {
    fn new() -> Self {
        Self(vec![0; LOW_LEN])
    }
    fn put(&mut self, at: u64, bytes: &[u8]) -> &mut Self {
        let at = at as usize;
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }
    fn desc(
        &mut self,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(table + u64::from(i) * 16, &raw)
    }
    /// The image without its trailing zeros (the target pads them back).
    fn bytes(&self) -> &[u8] {
        let end = self.0.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
        &self.0[..end]
    }
}

fn le16(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}

#[test]
#[ignore = "writes the seed corpora; run by hand"]
fn write_seed_corpora() {
    api_seeds();
    state_seeds();
    serial_seeds();
    pci_seeds();
    desc_seeds();
    blk_seeds();
    net_seeds();
    vhost_user_seeds();
}

fn api_seeds() {
    let bodies: [(&str, u8, &str); 9] = [
        (
            "create-minimal",
            0,
            r#"{"payload":{"kernel":"/k","cmdline":"x"},"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":67108864,"shared":true},"serial":{"mode":"Tty"},"console":{"mode":"Off"}}"#,
        ),
        (
            "create-defaults",
            0,
            r#"{"payload":{"kernel":"/k","firmware":null},"cpus":{"boot_vcpus":1,"max_vcpus":1,"max_phys_bits":46,"kvm_hyperv":false},"memory":{"size":67108864,"mergeable":false,"hotplug_method":"Acpi","shared":true,"hugepages":false,"prefault":false,"thp":true},"rng":{"src":"/dev/urandom","iommu":false},"iommu":false,"watchdog":false,"pvpanic":false}"#,
        ),
        (
            "create-devices",
            0,
            r#"{"payload":{"kernel":"/k","initramfs":"/i"},"disks":[{"id":"d0","vhost_user":true,"vhost_socket":"/b","num_queues":2,"queue_size":128,"readonly":false,"sparse":true,"image_type":"Unknown"}],"net":[{"id":"n0","vhost_user":true,"vhost_socket":"/n","mac":"52:54:00:12:34:56","num_queues":4,"ip":"192.168.249.1","mask":"255.255.255.0","vhost_mode":"Client","offload_tso":true}],"serial":{"mode":"File","file":"/tmp/s"}}"#,
        ),
        (
            "add-disk",
            1,
            r#"{"vhost_user":true,"vhost_socket":"/b","metrics_socket":"/bm","num_queues":1,"queue_size":256}"#,
        ),
        (
            "add-net",
            2,
            r#"{"vhost_user":true,"vhost_socket":"/n","metrics_socket":"/nm","mac":"52:54:00:00:00:01","num_queues":2}"#,
        ),
        (
            "restore",
            3,
            r#"{"source_url":"file:///tmp/snap","prefault":false,"resume":true,"memory_restore_mode":"Map"}"#,
        ),
        (
            "restore-copy",
            3,
            r#"{"source_url":"file:///snap","memory_restore_mode":"copy"}"#,
        ),
        ("snapshot", 4, r#"{"destination_url":"file:///tmp/snap"}"#),
        (
            "create-unknown",
            0,
            r#"{"payload":{"kernel":"/k"},"bogus":1}"#,
        ),
    ];
    for (name, endpoint, body) in bodies {
        let mut data = vec![endpoint];
        data.extend_from_slice(body.as_bytes());
        write("api_body", name, &data);
    }
}

fn state_seeds() {
    use std::sync::Arc;

    use kvm_ioctls::Kvm;
    use vmm::api::config::{parse, VmConfigBody};
    use vmm::devices::acpi::{AcpiPm, Ged};
    use vmm::devices::bus::{Bus, BusDevice};
    use vmm::devices::legacy::{ResetTrigger, I8042};
    use vmm::devices::rtc::Rtc;
    use vmm::devices::serial::Serial;
    use vmm::exit::ExitNotifier;
    use vmm::pci::{PciConfigIo, PciRoot};
    use vmm::snapshot::SnapshotState;
    use vmm::state::file::encode_state;
    use vmm::state::{DevicesState, VcpuState, VmState};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let exit = Arc::new(ExitNotifier::new().unwrap());
    let mut serial = Serial::new(evt(), evt(), Box::new(std::io::sink()));
    serial.write(1, &[0x01]);
    serial.enqueue(b"in");
    let mut rtc = Rtc::new();
    rtc.write(0, &[0x0b]);
    rtc.write(1, &[0x82]);
    let ged = Ged::new(evt());
    ged.press_power_button();
    let mmio = Arc::new(Bus::new("mmio"));
    let mut root = PciRoot::new(mmio.clone());
    let virtio = fuzzing::pci::drive(&pci_setup());
    // The transport's slot, as the state records it.
    let dummy = PciRoot::new(mmio);
    let mut pci = root.state();
    pci.slots.push(1);
    drop((&mut root, dummy));
    let io = PciConfigIo::new(Arc::new(std::sync::Mutex::new(PciRoot::new(Arc::new(
        Bus::new("mmio"),
    )))));
    let devices = DevicesState {
        version: DevicesState::VERSION,
        serial: serial.state(),
        rtc: rtc.state(),
        i8042: I8042::new(ResetTrigger(exit.clone())).state(),
        acpi_pm: AcpiPm::new(exit).state(),
        ged: ged.state(),
        pci,
        pci_io: io.state(),
        virtio: vec![virtio],
    };
    let body = br#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1},"memory":{"size":67108864}}"#;
    let (mut config, _) = parse::<VmConfigBody>(body).unwrap().into_config().unwrap();
    // into_config wants the socket to exist; a saved config need not.
    config.devices.push(vmm::vhost_user::DeviceConfig {
        kind: vmm::vhost_user::Kind::Block,
        socket: "/b".into(),
        queues: 1,
        queue_size: 256,
        metrics_socket: None,
    });
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_bindings::kvm_pit_config::default())
        .unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let snapshot = SnapshotState {
        config,
        ids: vec!["d0".into()],
        vcpus: vec![VcpuState::save(&vcpu, &kvm).unwrap()],
        vm: VmState::save(&vm),
        devices: devices.clone(),
        backends: vec![None],
    };
    let file = encode_state(&snapshot).unwrap();
    let payload = postcard::to_allocvec(&snapshot).unwrap();
    write("state_file", "snapshot-file", &file);
    write("state_file", "snapshot-payload", &payload);
    // A destination checks that a disk's socket exists: "/" does
    // wherever the target runs.
    let mut moved = snapshot.clone();
    moved.config.devices[0].socket = "/".into();
    let start = vmm::migration::stream::Start {
        config: moved.config.clone(),
        vmm_version: "seed".into(),
    };
    let start = postcard::to_allocvec(&start).unwrap();
    let moved = postcard::to_allocvec(&moved).unwrap();
    for local in [false, true] {
        write(
            "migration_stream",
            if local { "local" } else { "tcp" },
            &fuzzing::migration::seed(&start, &moved, local),
        );
    }
    write(
        "state_file",
        "devices-payload",
        &postcard::to_allocvec(&devices).unwrap(),
    );
    write(
        "state_file",
        "devices-file",
        &encode_state(&devices).unwrap(),
    );
}

/// Serial operation byte: kind (0 read, 1 write, 2 input, 3 save/restore)
/// and port.
fn s(kind: u8, port: u8) -> u8 {
    kind | (port << 2)
}

fn serial_seeds() {
    let setup = [
        s(1, 3),
        0x80,
        s(1, 0),
        0x01,
        s(1, 1),
        0x00,
        s(1, 3),
        0x03, // 115200 8N1
        s(1, 2),
        0xc7,
        s(1, 1),
        0x0f,
        s(1, 4),
        0x0b, // FIFO, all interrupts, OUT2
        s(1, 0),
        b'h',
        s(1, 0),
        b'i',
        s(0, 5),
        s(0, 2),
        s(2, 0),
        3,
        b'a',
        b'b',
        b'c',
        s(0, 2),
        s(0, 5),
        s(0, 0),
        s(0, 0),
        s(0, 0),
        s(3, 0),
        s(0, 6),
        s(1, 7),
        0x5a,
        s(0, 7),
    ];
    write("serial", "setup-io", &setup);
    let loopback = [
        s(1, 4),
        0x10,
        s(1, 0),
        b'x',
        s(1, 0),
        b'y',
        s(0, 5),
        s(0, 0),
        s(0, 6),
        s(1, 4),
        0x1f,
        s(0, 6),
        s(3, 0),
        s(0, 0),
        s(1, 4),
        0x08,
        s(2, 0),
        2,
        b'o',
        b'k',
    ];
    write("serial", "loopback", &loopback);
}

/// pci_devices operations.
struct Ops(Vec<u8>);

impl Ops {
    fn op(&mut self, kind: u8, size: usize, write: Option<u64>, off: u64) -> &mut Self {
        let s = match size {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        };
        self.0
            .push(kind | (s << 2) | if write.is_some() { 0x10 } else { 0 });
        if kind == 1 {
            self.0.push(off as u8);
        } else {
            self.0.extend_from_slice(&(off as u16).to_le_bytes());
        }
        if let Some(v) = write {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        self
    }
    fn bar_w(&mut self, off: u64, v: u64, size: usize) -> &mut Self {
        self.op(2, size, Some(v), off)
    }
    fn bar_r(&mut self, off: u64, size: usize) -> &mut Self {
        self.op(2, size, None, off)
    }
    fn ecam_w(&mut self, off: u64, v: u64, size: usize) -> &mut Self {
        self.op(0, size, Some(v), off)
    }
    fn ecam_r(&mut self, off: u64, size: usize) -> &mut Self {
        self.op(0, size, None, off)
    }
}

/// Slot 1's MSI-X message control in ECAM (capability found by walking
/// the list of a fresh transport's configuration space).
fn msix_control() -> u64 {
    let state = fuzzing::pci::drive(&[]);
    let byte = |off: usize| (state.config.regs[off / 4] >> ((off % 4) * 8)) as u8;
    let mut cap = usize::from(byte(0x34));
    while byte(cap) != 0x11 {
        cap = usize::from(byte(cap + 1));
    }
    0x8000 + cap as u64 + 2
}

/// What a driver does up to DRIVER_OK (the virtio-pci unit tests' set_up).
fn pci_setup() -> Vec<u8> {
    let mut o = Ops(vec![0]);
    o.ecam_w(0x8004, 0x6, 2)
        .bar_w(0x08, 0, 4)
        .bar_w(0x0c, 1, 4)
        .bar_w(0x08, 1, 4)
        .bar_w(0x0c, 1, 4)
        .bar_w(0x14, 3, 1)
        .bar_w(0x14, 0x0b, 1)
        .bar_w(0x16, 0, 2)
        .bar_w(0x18, 128, 2)
        .bar_w(0x1a, 1, 2)
        .bar_w(0x20, 0x1000, 4)
        .bar_w(0x28, 0x2000, 4)
        .bar_w(0x30, 0x3000, 8)
        .bar_w(0x1c, 1, 2)
        .bar_w(0x16, 1, 2)
        .bar_w(0x18, 64, 2)
        .bar_w(0x10, 0, 2);
    for v in 0..3u64 {
        let e = 0x8000 + v * 16;
        o.bar_w(e, 0xfee0_0000, 4)
            .bar_w(e + 8, 0x40 + v, 4)
            .bar_w(e + 12, 0, 4);
    }
    o.ecam_w(msix_control(), 0x8000, 2);
    o.0
}

fn pci_seeds() {
    let mut setup = pci_setup();
    write("pci_devices", "driver-setup", &setup);
    let mut o = Ops(std::mem::take(&mut setup));
    o.bar_w(0x14, 0x0f, 1)
        .bar_r(0x00, 4)
        .bar_r(0x14, 1)
        .bar_r(0x18, 2)
        .bar_r(0x20, 8)
        .bar_r(0x1000, 1)
        .bar_r(0x2000, 4)
        .bar_w(0x3000, 0, 2)
        .bar_r(0x8000, 8)
        .bar_r(0xc000, 8)
        .ecam_r(0x8000, 4)
        .ecam_r(0x8034, 1);
    o.0.push(3);
    o.op(1, 4, Some(0x8000_0800), 0).op(1, 4, None, 4);
    // Function mask, then off, then a reset.
    o.ecam_w(msix_control(), 0xc000, 2)
        .ecam_w(msix_control(), 0, 2)
        .bar_w(0x14, 0, 1);
    write("pci_devices", "driver-ok-and-reads", &o.0);
    // A BAR size probe and a move of the 64-bit BAR 0.
    let mut m = Ops(vec![1]);
    m.ecam_w(0x8010, 0xffff_ffff, 4)
        .ecam_r(0x8010, 4)
        .ecam_w(0x8014, 0xffff_ffff, 4)
        .ecam_r(0x8014, 4)
        .ecam_w(0x8010, 0, 4)
        .ecam_w(0x8014, 2, 4)
        .bar_w(0x14, 0x0f, 1)
        .bar_w(0x3004, 0, 2)
        .op(1, 4, Some(0x8000_0010), 0)
        .op(1, 2, None, 6);
    write("pci_devices", "bar-move", &m.0);
}

fn desc_input(size: u16, head: u16, table: u32, img: &Image) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&le16(size));
    d.extend_from_slice(&le16(head));
    d.extend_from_slice(&table.to_le_bytes());
    d.extend_from_slice(img.bytes());
    d
}

fn desc_seeds() {
    let mut img = Image::new();
    img.desc(0, 0, 0x1000, 16, NEXT, 2)
        .desc(0, 2, 0x2000, 1, WRITE, 0);
    write("desc_chain", "direct", &desc_input(4, 0, 0, &img));
    let mut img = Image::new();
    img.desc(0, 0, 0x800, 32, INDIRECT, 0)
        .desc(0x800, 0, 0x1000, 16, NEXT, 1)
        .desc(0x800, 1, 0x3ff0, 0x20, WRITE, 0);
    write(
        "desc_chain",
        "indirect-straddling",
        &desc_input(4, 0, 0, &img),
    );
    let mut img = Image::new();
    img.desc(0x100, 0, 0x1000, 16, NEXT, 1)
        .desc(0x100, 1, 0x1000, 16, NEXT, 0);
    write("desc_chain", "loop", &desc_input(2, 0, 0x100, &img));
}

fn blk_input(sectors: u8, flags: u8, heads: &[u16], img: &Image) -> Vec<u8> {
    let mut d = vec![sectors, flags];
    d.extend_from_slice(&le16(16));
    d.extend_from_slice(&le16(0));
    d.push(heads.len() as u8);
    for h in heads {
        d.extend_from_slice(&le16(*h));
    }
    d.extend_from_slice(img.bytes());
    d
}

fn blk_header(img: &mut Image, at: u64, kind: u32, sector: u64) {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    img.put(at, &hdr);
}

fn blk_seeds() {
    // Head 0: read; head 3: write across regions A and B; head 6: flush;
    // head 8: get id; head 10: discard; head 12: write zeroes; head 14:
    // unsupported type.
    let mut img = Image::new();
    blk_header(&mut img, 0x1000, 0, 1);
    img.desc(0, 0, 0x1000, 16, NEXT, 1)
        .desc(0, 1, 0x2000, 512, NEXT | WRITE, 2)
        .desc(0, 2, 0x3000, 1, WRITE, 0);
    blk_header(&mut img, 0x1010, 1, 2);
    img.put(0x3f00, &[0xab; 512])
        .desc(0, 3, 0x1010, 16, NEXT, 4)
        .desc(0, 4, 0x3f00, 512, NEXT, 5)
        .desc(0, 5, 0x3001, 1, WRITE, 0);
    blk_header(&mut img, 0x1020, 4, 0);
    img.desc(0, 6, 0x1020, 16, NEXT, 7)
        .desc(0, 7, 0x3002, 1, WRITE, 0);
    blk_header(&mut img, 0x1030, 8, 0);
    img.desc(0, 8, 0x1030, 16, NEXT, 9)
        .desc(0, 9, 0x3010, 21, WRITE, 0);
    blk_header(&mut img, 0x1040, 11, 0);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&1u64.to_le_bytes());
    seg[8..12].copy_from_slice(&2u32.to_le_bytes());
    img.put(0x1100, &seg);
    img.desc(0, 10, 0x1040, 16, NEXT, 11)
        .desc(0, 11, 0x1100, 16, NEXT, 15)
        .desc(0, 15, 0x3003, 1, WRITE, 0);
    blk_header(&mut img, 0x1050, 13, 0);
    seg[12] = 1;
    img.put(0x1110, &seg);
    img.desc(0, 12, 0x1050, 32, NEXT, 13)
        .desc(0, 13, 0x3004, 1, WRITE, 0);
    img.put(0x1060, &seg);
    blk_header(&mut img, 0x1070, 99, 0);
    img.desc(0, 14, 0x1070, 16, 0, 0);
    write(
        "blk_request",
        "all-types",
        &blk_input(8, 2, &[0, 3, 6, 8, 10, 12, 14, 0], &img),
    );
    write(
        "blk_request",
        "read-only",
        &blk_input(8, 1, &[3, 0, 10], &img),
    );
    // Indirect table, a read past the end of a one-sector disk.
    let mut img = Image::new();
    blk_header(&mut img, 0x1000, 0, 1);
    img.desc(0, 0, 0x800, 48, INDIRECT, 0)
        .desc(0x800, 0, 0x1000, 16, NEXT, 1)
        .desc(0x800, 1, 0x2000, 512, NEXT | WRITE, 2)
        .desc(0x800, 2, 0x3000, 1, WRITE, 0);
    write(
        "blk_request",
        "indirect-past-end",
        &blk_input(1, 0, &[0], &img),
    );
}

const F_CSUM: u64 = 1;
const F_HOST_TSO4: u64 = 1 << 11;
const F_VERSION_1: u64 = 1 << 32;

fn net_seeds() {
    let mut tx = Vec::new();
    tx.extend_from_slice(&le16(1500));
    tx.extend_from_slice(&(F_VERSION_1 | F_CSUM | F_HOST_TSO4).to_le_bytes());
    // NEEDS_CSUM, TCPv4 GSO, hdr_len 54, gso_size 1448, csum 34+16.
    let gso: [u8; 12] = [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
    tx.extend_from_slice(&gso);
    tx.extend_from_slice(&le16(3000));
    tx.extend_from_slice(&le16(8));
    tx.extend_from_slice(&le16(0));
    tx.extend_from_slice(&[3]);
    for h in [0u16, 2, 3] {
        tx.extend_from_slice(&le16(h));
    }
    let mut img = Image::new();
    img.put(0x1000, &[0u8; 12]).put(0x2000, &[0x45; 60]);
    img.put(0x1100, &gso).put(0x110c, &[0x45; 60]);
    img.desc(0, 0, 0x1000, 12, NEXT, 1)
        .desc(0, 1, 0x2000, 60, 0, 0)
        .desc(0, 2, 0x1100, 72, 0, 0)
        .desc(0, 3, 0x3ff0, 64, 0, 0);
    tx.extend_from_slice(img.bytes());
    write("net_tx", "plain-gso-straddling", &tx);

    let mut ctrl = Vec::new();
    ctrl.extend_from_slice(&le16(4));
    ctrl.extend_from_slice(&le16(8));
    ctrl.extend_from_slice(&le16(0));
    ctrl.push(4);
    for h in [0u16, 3, 5, 7] {
        ctrl.extend_from_slice(&le16(h));
    }
    let mut img = Image::new();
    // MQ_VQ_PAIRS_SET 2; RX promisc on; MAC table set; unknown class.
    img.put(0x1000, &[4, 0]).put(0x1010, &le16(2));
    img.put(0x1020, &[0, 0, 1]);
    img.put(0x1030, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    img.put(0x1040, &[9, 9]);
    img.desc(0, 0, 0x1000, 2, NEXT, 1)
        .desc(0, 1, 0x1010, 2, NEXT, 2)
        .desc(0, 2, 0x3000, 1, WRITE, 0)
        .desc(0, 3, 0x1020, 3, NEXT, 4)
        .desc(0, 4, 0x3001, 1, WRITE, 0)
        .desc(0, 5, 0x1030, 10, NEXT, 6)
        .desc(0, 6, 0x3002, 1, WRITE, 0)
        .desc(0, 7, 0x1040, 2, 0, 0);
    ctrl.extend_from_slice(img.bytes());
    write("net_ctrl", "commands", &ctrl);
}

fn vhost_user_seeds() {
    for (name, data) in fuzzing::vhost_user::seeds() {
        write("vhost_user", name, &data);
    }
}
