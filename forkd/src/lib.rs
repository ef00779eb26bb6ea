//! forkd, the per-host fork daemon: it warms templates and clones workers from them through
//! a driver (`spawn`, `fork`, `vm`), and kills clones when asked.
