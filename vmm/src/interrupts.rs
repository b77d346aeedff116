//! GSI routing: the legacy PIC/IOAPIC routes KVM starts with, plus one MSI
//! route per MSI-X vector in use. `KVM_SET_GSI_ROUTING` replaces the whole
//! table, so every change re-sends all of it.
//!
//! The routing table is not saved on its own: it is derived from the MSI-X
//! tables, and restoring each function's [`crate::pci::msix::MsixState`]
//! re-creates its routes here (`KVM_SET_GSI_ROUTING` is not part of the
//! irqchip state KVM saves). GSIs are allocated again in device order, so
//! a VM rebuilt like the saved one gets the same numbers, though nothing
//! depends on that.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use thiserror::Error;

use crate::devices::bus::lock;

/// IOAPIC pins; GSIs from here on are free for MSI.
pub const IOAPIC_PINS: u32 = 24;
/// KVM's routing table limit on x86.
const MAX_GSI: u32 = 1024;

/// Errors managing interrupt routes.
#[derive(Debug, Error)]
pub enum InterruptError {
    #[error("No free GSI for {0} more MSI vectors")]
    OutOfGsis(u32),
    #[error("Cannot set GSI routing")]
    Routing(#[source] kvm_ioctls::Error),
}

/// One MSI message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// The VM's GSI routing table.
pub struct Router {
    vm: Arc<VmFd>,
    msi: Mutex<(u32, BTreeMap<u32, MsiMessage>)>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

impl Router {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: Mutex::new((IOAPIC_PINS, BTreeMap::new())),
        }
    }

    /// Reserves `n` consecutive GSIs for MSI vectors.
    pub fn allocate(&self, n: u32) -> Result<u32, InterruptError> {
        let mut g = lock(&self.msi);
        let base = g.0;
        if base + n > MAX_GSI {
            return Err(InterruptError::OutOfGsis(n));
        }
        g.0 += n;
        Ok(base)
    }

    /// Routes `gsi` to `msg`, or removes its route with `None`.
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut g = lock(&self.msi);
        let changed = match msg {
            Some(m) => g.1.insert(gsi, m) != Some(m),
            None => g.1.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&g.1)?;
        }
        Ok(())
    }

    /// The MSI routes in place, by GSI.
    pub fn msi_routes(&self) -> BTreeMap<u32, MsiMessage> {
        lock(&self.msi).1.clone()
    }

    fn commit(&self, msi: &BTreeMap<u32, MsiMessage>) -> Result<(), InterruptError> {
        let mut entries = Vec::with_capacity(40 + msi.len());
        // KVM's default table: ISA IRQs on both the PICs and the IOAPIC.
        for pin in 0..16 {
            let chip = if pin < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(pin, chip, pin % 8));
        }
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for (gsi, m) in msi {
            entries.push(kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: m.addr as u32,
                        address_hi: (m.addr >> 32) as u32,
                        data: m.data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            });
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| InterruptError::OutOfGsis(entries.len() as u32))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(InterruptError::Routing)
    }
}
