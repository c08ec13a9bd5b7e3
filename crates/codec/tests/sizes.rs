//! Packets are moved by value through the decoder and the engine on every message: keep them
//! small. An empty property set must cost one pointer, not a few hundred bytes of memcpy.

use petrel_codec::{Packet, Properties, Publish};

#[test]
fn hot_path_types_stay_small() {
    println!(
        "Packet {} B, Publish {} B, Properties {} B",
        std::mem::size_of::<Packet>(),
        std::mem::size_of::<Publish>(),
        std::mem::size_of::<Properties>()
    );
    assert_eq!(
        std::mem::size_of::<Properties>(),
        std::mem::size_of::<usize>()
    );
    assert!(std::mem::size_of::<Publish>() <= 88);
    assert!(std::mem::size_of::<Packet>() <= 96);
}
