//! Assembly: the two boot entries, the GDT, the boot page tables, the
//! interrupt stubs, the AP 64-bit entry and the INIT/SIPI trampoline.
//!
//! Everything here uses general-purpose registers only; no `int`, `int3`,
//! `ud2`, SSE or x87 (see DESIGN.md section 4).

use crate::smp::{AP_STACK_SIZE, MAX_APS, TRAMPOLINE_BASE};

const BSP_STACK_SIZE: usize = 32 * 1024;

core::arch::global_asm!(
    r#"
/* ------------------------------------------------------------------ */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen".            */
    .section .note.Xen, "a"
    .balign 4
    .long 4                 /* namesz */
    .long 8                 /* descsz */
    .long 18                /* type */
    .asciz "Xen"
    .balign 4
    .quad pvh32_entry
    .balign 4

/* ------------------------------------------------------------------ */
    .section .text.entry, "ax"

/* PVH entry: 32-bit protected mode, paging off, ebx = hvm_start_info. */
    .code32
    .globl pvh32_entry
pvh32_entry:
    mov %cr0, %eax
    mov %eax, entry_state
    mov $bsp_stack_top, %esp
    pushfl
    popl %eax
    mov %eax, entry_state + 16
    xor %eax, %eax
    mov %cs, %ax
    mov %eax, entry_state + 24
    mov %ds, %ax
    mov %eax, entry_state + 32
    mov %ss, %ax
    mov %eax, entry_state + 40
    lgdt gdt_ptr
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov %cr4, %eax
    or $0x20, %eax                  /* PAE */
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx           /* EFER */
    rdmsr
    mov %eax, entry_state + 8
    or $0x100, %eax                 /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            /* PG | PE */
    mov %eax, %cr0
    ljmp $0x10, $pvh64

    .code64
pvh64:
    lea bsp_stack_top(%rip), %rsp
    mov $2, %edi                    /* protocol = PVH */
    mov %ebx, %esi                  /* zero-extends: start_info */
    call tg_main
    jmp halt_forever

/* Linux 64-bit entry (e_entry): long mode, rsi = boot_params. */
    .globl linux64_entry
linux64_entry:
    lea bsp_stack_top(%rip), %rsp
    mov %rsi, %rbx
    mov %cr0, %rax
    mov %rax, entry_state(%rip)
    pushfq
    pop %rax
    mov %rax, entry_state + 16(%rip)
    xor %eax, %eax
    mov %cs, %ax
    mov %rax, entry_state + 24(%rip)
    mov %ds, %ax
    mov %rax, entry_state + 32(%rip)
    mov %ss, %ax
    mov %rax, entry_state + 40(%rip)
    mov $0xC0000080, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, entry_state + 8(%rip)
    mov $1, %edi                    /* protocol = Linux */
    mov %rbx, %rsi
    call tg_main
    jmp halt_forever

/* AP 64-bit entry, reached from the trampoline with the BSP's CR3 and GDT. */
    .globl ap_entry64
ap_entry64:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $1, %eax
    lock xadd %eax, AP_STARTED(%rip)
    cmp ${max_aps}, %eax
    jae halt_forever
    inc %eax
    imul ${ap_stack_size}, %eax, %eax
    lea AP_STACKS(%rip), %rsp
    add %rax, %rsp
    call ap_main

    .globl halt_forever
halt_forever:
    cli
    hlt
    jmp halt_forever

/* Reload CS and the data segments after lgdt (called from Rust). */
    .globl reload_segments
reload_segments:
    pop %rax                        /* return address */
    push $0x10
    push %rax
    mov $0x18, %ecx
    mov %ecx, %ds
    mov %ecx, %es
    mov %ecx, %ss
    mov %ecx, %fs
    mov %ecx, %gs
    lretq

/* ------------------------------------------------------------------ */
/* Interrupt and exception stubs.                                      */
    .section .text, "ax"
    .code64

    .globl irq_serial
irq_serial:
    push %rax
    push %rdx
    lock incl SERIAL_IRQ_COUNT(%rip)
    mov $0x3FA, %dx                 /* IIR */
    in %dx, %al
    mov $0x3FD, %dx                 /* LSR */
    in %dx, %al
    mov $0xFEE000B0, %eax           /* LAPIC EOI */
    movl $0, (%rax)
    pop %rdx
    pop %rax
    iretq

    .globl irq_other
irq_other:
    push %rax
    mov $0xFEE000B0, %eax
    movl $0, (%rax)
    pop %rax
    iretq

    .globl irq_spurious
irq_spurious:
    iretq

/* MSI-X vectors 0x40..0x5F: TSC at entry (MSIX_TSC[n]), count per vector
   (MSIX_COUNT[n]), EOI. */
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
irq_msix_\n:
    push %rax
    push %rdx
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, MSIX_TSC + 8 * \n(%rip)
    lock incl MSIX_COUNT + 4 * \n(%rip)
    mov $0xFEE000B0, %eax
    movl $0, (%rax)
    pop %rdx
    pop %rax
    iretq
    .endr

    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
exc_stub_\n:
    .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    push $0
    .endif
    push $\n
    jmp exc_common
    .endr

exc_common:
    mov %rsp, %rdi                  /* [vector, error, rip, cs, rflags, rsp, ss] */
    and $-16, %rsp
    call exception_handler
    jmp halt_forever

    .section .rodata, "a"
    .balign 8
    .globl exc_stub_table
exc_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\n
    .endr

    .globl msix_stub_table
msix_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad irq_msix_\n
    .endr

/* ------------------------------------------------------------------ */
/* GDT: 0x08 32-bit code, 0x10 64-bit code, 0x18 data (flat).          */
    .section .data, "aw"
    .balign 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
gdt_end:
    .balign 8
    .word 0, 0, 0
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 8
    .globl entry_state
entry_state:                        /* cr0, efer, rflags, cs, ds, ss */
    .quad 0, 0, 0, 0, 0, 0

/* BSP stack. */
    .section .bss, "aw", @nobits
    .balign 4096
bsp_stack:
    .skip {bsp_stack_size}
    .globl bsp_stack_top
bsp_stack_top:

/* Boot page tables for the PVH path: identity map of 4 GiB, 2 MiB pages. */
    .section .data.pagetables, "aw"
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x3
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x3
    .quad boot_pd + 0x1003
    .quad boot_pd + 0x2003
    .quad boot_pd + 0x3003
    .fill 508, 8, 0
boot_pd:
    .set pde, 0x83
    .rept 2048
    .quad pde
    .set pde, pde + 0x200000
    .endr

/* ------------------------------------------------------------------ */
/* AP trampoline: copied to TRAMPOLINE_BASE (SIPI vector = base >> 12);  */
/* real mode -> protected mode -> long mode -> ap_entry64.              */
    .section .trampoline, "a"
    .balign 16
    .globl tramp_start
tramp_start:
    .code16
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (tramp_gdtr - tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, ${tramp_base} + (tramp32 - tramp_start)

    .code32
tramp32:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov {tramp_base} + (tramp_cr3 - tramp_start), %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmp $0x10, ${tramp_base} + (tramp64 - tramp_start)

    .code64
tramp64:
    mov {tramp_base} + (tramp_entry - tramp_start), %rax
    jmp *%rax

    .balign 8
    .globl tramp_data
tramp_data:
tramp_gdtr:                         /* +0: limit u16, base u32 */
    .word 0
    .long 0
    .word 0
tramp_cr3:                          /* +8 */
    .long 0
    .long 0
tramp_entry:                        /* +16 */
    .quad 0
    .globl tramp_end
tramp_end:
    .code64
"#,
    max_aps = const MAX_APS,
    ap_stack_size = const AP_STACK_SIZE,
    tramp_base = const TRAMPOLINE_BASE,
    bsp_stack_size = const BSP_STACK_SIZE,
    options(att_syntax)
);
