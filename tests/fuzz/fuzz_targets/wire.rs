//! Every wire decoder: control frames, relay frames, DHT messages, ledger sync messages,
//! sealed beacons and VPN packet headers; the first byte picks the decoder.
#![no_main]

use kairos_p2p::discovery::beacon::Beacon;
use kairos_p2p::discovery::kad::message::Message;
use kairos_p2p::ledger::{Limits, SyncLimits, SyncMessage};
use kairos_p2p::node::control::Control;
use kairos_p2p::overlay::relay::RelayFrame;
use kairos_p2p::token::{NEVER_ROTATE, NetworkToken};
use kairos_p2p::vpn::packet::IpHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => drop(Control::decode(rest)),
        1 => drop(RelayFrame::decode(rest)),
        2 => drop(Message::decode(rest)),
        3 => {
            let limits = SyncLimits::for_ledger(&Limits::for_max_message_size(1 << 20), 1 << 20);
            drop(SyncMessage::decode(rest, &limits));
        }
        4 => {
            let token = NetworkToken::generate_with(NEVER_ROTATE, &mut |b| b.fill(7));
            drop(Beacon::open(&token.key_schedule(), 1_700_000_000, rest));
        }
        _ => drop(IpHeader::parse(rest)),
    }
});
