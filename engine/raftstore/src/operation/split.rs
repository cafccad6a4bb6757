//! Range splits: not built yet. A split is an admin command proposed by a leader
//! (`Split { split_key, new range id, new peer ids }`); applying it shrinks the left
//! descriptor, writes the right one with its initial raft state in the same apply
//! batch, bumps both epochs, and opens the right replica on this store. It lands
//! here, beside its simulation coverage.
