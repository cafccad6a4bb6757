//! Leadership transfer. The transferee campaigns with a forced vote that followers
//! grant even within the lease they gave this leader, so the lease is void for the
//! rest of the term in which a transfer began (`Replica::transfer_leader`), and a
//! host publishing leases for reads off the worker must publish the void lease
//! before the `MsgTimeoutNow` leaves. Every transfer goes through
//! [`Driver::transfer_leader`]; raft messages that would start one from outside
//! (`MsgTransferLeader`) must be refused by the host at its edge.

use rangekv_types::RangeId;

use crate::driver::Driver;
use crate::host::{Host, Types};

impl<T: Types> Driver<T> {
    /// Asks `range`'s replica here, if it leads, to hand leadership to peer `to`.
    /// Returns whether the range is here.
    pub fn transfer_leader(&mut self, range: RangeId, to: u64, host: &mut impl Host<T>) -> bool {
        let Some(peer) = self.peers.get_mut(&range) else {
            return false;
        };
        peer.replica.transfer_leader(to);
        // The void lease is published before the loop sends `MsgTimeoutNow`.
        host.publish(&peer.handle, peer.view());
        peer.set_quiesced(false, host);
        self.awake.insert(range);
        self.touched.insert(range);
        true
    }
}
