//! The local API's HTTP/1.1 connection: arbitrary bytes in arbitrary pieces.
#![no_main]

use std::time::Instant;

use kairos_p2p::api::http::Connection;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut conn = Connection::new(now);
    // The first byte sets the piece size, as reads of a socket would cut the stream.
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    for piece in rest.chunks(usize::from(size).max(1)) {
        conn.feed(now, piece);
        while conn.poll_request().is_some() {}
    }
    conn.handle_eof();
    while conn.poll_request().is_some() {}
});
