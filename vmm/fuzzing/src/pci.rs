//! The VMM's PCI side as a guest reaches it: configuration space through
//! ECAM (MMIO) and ports 0xCF8/0xCFC, and a virtio-pci function's BAR 0
//! (common configuration, ISR, device configuration, notify, MSI-X table
//! and PBA), with BAR moves, MSI-X routing and irqfds on a real KVM VM.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};
use vmm::devices::bus::Bus;
use vmm::interrupts::Router;
use vmm::pci::{PciConfigIo, PciDevice, PciEcam, PciRoot};
use vmm::virtio::pci::{VirtioPci, VirtioPciState};
use vmm::virtio::{ActivateError, ActiveQueue, VirtioDevice, F_VERSION_1, TYPE_BLOCK};

use crate::input::Input;

pub const ECAM_BASE: u64 = 0xe000_0000;
const ECAM_LEN: u64 = 1 << 20;
pub const BAR: u64 = 0x1_0000_0000;
const CONFIG_PORT: u64 = 0xcf8;

/// A device half that accepts everything, or refuses to start when told
/// to (the transport then sets NEEDS_RESET).
struct Fake {
    refuse: bool,
    config: [u8; 64],
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_size(&self) -> u16 {
        256
    }
    fn num_queues(&self) -> usize {
        // One: each queue costs an ioeventfd registered and unregistered
        // per input, milliseconds each on this nested KVM.
        1
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | 0x7
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
            {
                *b = *v;
            }
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(v) = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get_mut(o + i))
            {
                *v = *b;
            }
        }
    }
    fn activate(&mut self, _features: u64, queues: &[ActiveQueue]) -> Result<(), ActivateError> {
        assert!(queues.iter().all(|q| q.index < 1));
        if self.refuse {
            return Err("refused".into());
        }
        Ok(())
    }
    fn reset(&mut self) {}
}

fn new_vm() -> Arc<VmFd> {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    Arc::new(vm)
}

thread_local! {
    /// One VM for every input: creating one costs far more than an input.
    /// Each input gets its own router, transport and buses, all dropped
    /// (ioeventfds and irqfds unregistered) at its end.
    static VM: RefCell<Option<Arc<VmFd>>> = const { RefCell::new(None) };
}

fn transport(refuse: bool) -> (VirtioPci, Arc<VmFd>) {
    let fake = || {
        Box::new(Fake {
            refuse,
            config: [0; 64],
        })
    };
    VM.with(|cell| {
        let mut cell = cell.borrow_mut();
        let vm = cell.get_or_insert_with(new_vm).clone();
        let router = Arc::new(Router::new(vm.clone()));
        match VirtioPci::new(fake(), BAR, vm.clone(), router) {
            Ok(t) => (t, vm),
            Err(_) => {
                // Something an input left registered on the VM: start
                // afresh.
                let vm = new_vm();
                *cell = Some(vm.clone());
                let router = Arc::new(Router::new(vm.clone()));
                let t = VirtioPci::new(fake(), BAR, vm.clone(), router)
                    .expect("virtio-pci on a new VM");
                (t, vm)
            }
        }
    })
}

const SIZES: [usize; 4] = [1, 2, 4, 8];

/// First byte: bit 0 makes the device refuse to start. Then operations:
/// one byte (bits 0-1: ECAM, config ports, BAR 0 or a saved-state round
/// trip; bits 2-3: access size 1, 2, 4 or 8; bit 4: write), an offset (u16
/// for ECAM and BAR 0, u8 for the ports) and, for writes, a u64 value.
pub fn pci_devices(data: &[u8]) {
    drive(data);
}

/// Runs [`pci_devices`]' operations; returns the transport's state at the
/// end (the seed generator uses it).
pub fn drive(data: &[u8]) -> VirtioPciState {
    let mut inp = Input::new(data);
    let (t, _vm) = transport(inp.bool());
    let dev = Arc::new(Mutex::new(t));
    let mmio = Arc::new(Bus::new("mmio"));
    let pio = Bus::new("pio");
    let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone())));
    let slot = root
        .lock()
        .unwrap()
        .add(dev.clone())
        .expect("an empty bus takes a device");
    assert_eq!(slot, 1);
    mmio.insert(
        ECAM_BASE,
        ECAM_LEN,
        Arc::new(Mutex::new(PciEcam::new(root.clone()))),
    )
    .expect("ECAM window");
    pio.insert(CONFIG_PORT, 8, Arc::new(Mutex::new(PciConfigIo::new(root))))
        .expect("config ports");

    while !inp.is_empty() {
        let op = inp.u8();
        let size = SIZES[usize::from((op >> 2) & 3)];
        let write = op & 0x10 != 0;
        let (bus, addr, size) = match op & 3 {
            0 => (&*mmio, ECAM_BASE + u64::from(inp.u16()), size),
            1 => (&pio, CONFIG_PORT + u64::from(inp.u8() & 7), size.min(4)),
            2 => {
                let bar = dev.lock().unwrap().config().bar(0).map_or(BAR, |b| b.addr);
                (&*mmio, bar.wrapping_add(u64::from(inp.u16())), size)
            }
            _ => {
                let s = dev.lock().unwrap().state();
                let bytes = postcard::to_allocvec(&s).expect("state encodes");
                let back: VirtioPciState = postcard::from_bytes(&bytes).expect("state decodes");
                assert_eq!(back, s);
                continue;
            }
        };
        if write {
            let v = inp.u64().to_le_bytes();
            bus.write(addr, &v[..size]);
        } else {
            let mut b = [0u8; 8];
            bus.read(addr, &mut b[..size]);
        }
    }
    let state = dev.lock().unwrap().state();
    state
}
