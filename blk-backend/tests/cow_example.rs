//! The COW overlay example, served in-process and driven by the synthetic
//! frontend: writes land in the overlay, the base image is never modified.

mod common;
#[allow(dead_code)]
#[path = "../examples/cow_overlay.rs"]
mod cow_overlay;

use backends::frontend::blk::S_OK;
use common::*;

#[test]
fn writes_go_to_the_overlay_and_reads_merge_both() {
    let dir = TempDir::new("cow");
    let (base, overlay, socket) = (
        dir.path("base.img"),
        dir.path("overlay.img"),
        dir.path("cow.sock"),
    );
    std::fs::write(&base, pattern(1, 1 << 20)).unwrap();
    let args = [&socket, &base, &overlay].map(|p| p.to_str().unwrap().to_string());
    std::thread::spawn(move || cow_overlay::serve(&args[0], &args[1], &args[2]).unwrap());
    let mut drv = driver(&socket, config(1));

    let st = drv.write(0, 1, &pattern(9, 1024), TIMEOUT).unwrap();
    let (rst, back) = drv.read(0, 0, 4096, TIMEOUT).unwrap();

    let mut expected = pattern(1, 1 << 20)[..4096].to_vec();
    expected[512..1536].copy_from_slice(&pattern(9, 1024));
    assert_eq!((st, rst), (S_OK, S_OK));
    assert_eq!(back, expected);
    assert_eq!(std::fs::read(&base).unwrap(), pattern(1, 1 << 20));
    assert_eq!(
        &std::fs::read(&overlay).unwrap()[512..1536],
        &pattern(9, 1024)[..]
    );
}
