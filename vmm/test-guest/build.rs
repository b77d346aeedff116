//! Links the guest at 1 MiB with `link.ld`, as a static, non-PIE executable.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg=-T{dir}/link.ld");
    // The target defaults to static-pie; the 32-bit/16-bit entry code needs absolute
    // addresses, so link a plain static executable (later -no-pie wins over -pie).
    println!("cargo:rustc-link-arg=--no-pie");
    println!("cargo:rustc-link-arg=-static");
    println!("cargo:rustc-link-arg=--no-dynamic-linker");
    println!("cargo:rustc-link-arg=-znorelro");
    println!("cargo:rustc-link-arg=--build-id=none");
}
