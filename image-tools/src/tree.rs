//! The flattened image as an in-memory index: a directory tree whose file
//! contents are references into layer tarballs (never copies), built layer
//! by layer with OCI whiteouts and written straight to a filesystem image by
//! [`crate::erofs`]. Nothing here touches the host filesystem, so a hostile
//! layer can at worst produce a strange tree, never a write outside it.
//!
//! Paths are byte strings relative to the root. [`split_path`] turns tar
//! paths into components: leading `/` and `.` components are dropped
//! (absolute paths stay inside the image) and `..` is refused.

use std::collections::BTreeMap;

/// Index of a node in [`Tree::nodes`].
pub type NodeId = usize;

/// The root directory's node.
pub const ROOT: NodeId = 0;

/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest file name accepted, in bytes (erofs and most filesystems).
pub const MAX_NAME: usize = 255;

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// The path has a `..` component.
    #[error("path {0:?} has a '..' component")]
    DotDot(String),
    /// The path or one of its names is too long.
    #[error("path {0:?} is too long")]
    TooLong(String),
    /// The path has a NUL byte.
    #[error("path {0:?} has a NUL byte")]
    Nul(String),
}

/// Splits a tar path into its components, relative to the image root.
pub fn split_path(raw: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    let show = || String::from_utf8_lossy(raw).into_owned();
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong(show()));
    }
    if raw.contains(&0) {
        return Err(PathError::Nul(show()));
    }
    let mut parts = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(PathError::DotDot(show())),
            name if name.len() > MAX_NAME => return Err(PathError::TooLong(show())),
            name => parts.push(name),
        }
    }
    Ok(parts)
}

/// Where a regular file's bytes are: a range of one of the image's data
/// sources (an uncompressed layer blob or a decompressed layer spool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRef {
    /// Index into the source list given to the filesystem writer.
    pub source: u32,
    /// Byte offset in the source.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Ownership, permissions, time and extended attributes of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits, including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Extended attributes (full names such as `security.capability`), sorted.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A directory entry: the node it names and the layer that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    /// The node.
    pub node: NodeId,
    /// Index of the layer that created this entry (whiteouts and opaque
    /// directories only hide entries of lower layers).
    pub layer: usize,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory and its entries, sorted by name.
    Dir(BTreeMap<Vec<u8>, Child>),
    /// A regular file; `None` is empty.
    File(Option<DataRef>),
    /// A symbolic link and its target, never followed here.
    Symlink(Vec<u8>),
    /// A character device.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One inode of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Ownership, permissions, time, xattrs.
    pub meta: Meta,
    /// Type and contents.
    pub kind: Kind,
}

/// The image's directory tree. Hard links are several entries naming the
/// same node; nodes no entry names any more are skipped by the writer.
#[derive(Debug, Clone)]
pub struct Tree {
    /// Every node ever created; [`ROOT`] is the root directory.
    pub nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// An image with only an empty root directory (0755, root-owned).
    pub fn new() -> Self {
        Self {
            nodes: vec![Node {
                meta: Meta {
                    mode: 0o755,
                    ..Meta::default()
                },
                kind: Kind::Dir(BTreeMap::new()),
            }],
        }
    }

    /// Adds a node, named by nothing yet.
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The entries of directory `dir`, or `None` if it is not a directory.
    pub fn entries(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, Child>> {
        match &self.nodes.get(dir)?.kind {
            Kind::Dir(entries) => Some(entries),
            _ => None,
        }
    }

    fn entries_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Vec<u8>, Child>> {
        match &mut self.nodes.get_mut(dir)?.kind {
            Kind::Dir(entries) => Some(entries),
            _ => None,
        }
    }

    /// The node at `path`, following no symlink.
    pub fn lookup(&self, path: &[&[u8]]) -> Option<NodeId> {
        let mut at = ROOT;
        for name in path {
            at = self.entries(at)?.get(*name)?.node;
        }
        Some(at)
    }

    /// The directory at `path`, created (0755, root, time 0) where missing.
    /// A non-directory in the way is replaced by a directory, as a
    /// directory of an upper overlay layer hides a lower file or symlink:
    /// a symlink is never followed, so entries "under" it land in a real
    /// directory inside the image.
    pub fn make_dirs(&mut self, path: &[&[u8]], layer: usize) -> NodeId {
        let mut at = ROOT;
        for name in path {
            let existing = self
                .entries(at)
                .and_then(|e| e.get(*name))
                .map(|c| c.node)
                .filter(|&n| matches!(self.nodes[n].kind, Kind::Dir(_)));
            at = match existing {
                Some(dir) => dir,
                None => {
                    let dir = self.add(Node {
                        meta: Meta {
                            mode: 0o755,
                            ..Meta::default()
                        },
                        kind: Kind::Dir(BTreeMap::new()),
                    });
                    self.link(at, name, dir, layer);
                    dir
                }
            };
        }
        at
    }

    /// Names `node` as `name` in directory `dir`, replacing any entry.
    pub fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId, layer: usize) {
        if let Some(entries) = self.entries_mut(dir) {
            entries.insert(name.to_vec(), Child { node, layer });
        }
    }

    /// Removes entry `name` of `dir` if a layer below `layer` wrote it.
    pub fn whiteout(&mut self, dir: NodeId, name: &[u8], layer: usize) {
        if let Some(entries) = self.entries_mut(dir) {
            if entries.get(name).is_some_and(|c| c.layer < layer) {
                entries.remove(name);
            }
        }
    }

    /// Removes every entry of `dir` that a layer below `layer` wrote.
    pub fn make_opaque(&mut self, dir: NodeId, layer: usize) {
        if let Some(entries) = self.entries_mut(dir) {
            entries.retain(|_, c| c.layer >= layer);
        }
    }

    /// Calls `visit(path, node)` for every entry reachable from the root,
    /// depth first in name order, the root first with an empty path.
    pub fn walk(&self, mut visit: impl FnMut(&[u8], NodeId)) {
        let mut stack: Vec<(Vec<u8>, NodeId)> = vec![(Vec::new(), ROOT)];
        while let Some((path, node)) = stack.pop() {
            visit(&path, node);
            if let Some(entries) = self.entries(node) {
                for (name, child) in entries.iter().rev() {
                    let mut p = path.clone();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    stack.push((p, child.node));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tree: &mut Tree) -> NodeId {
        tree.add(Node {
            meta: Meta::default(),
            kind: Kind::File(None),
        })
    }

    #[test]
    fn split_path_keeps_paths_inside_the_root() {
        assert_eq!(
            split_path(b"/etc//passwd").unwrap(),
            [&b"etc"[..], b"passwd"]
        );
        assert_eq!(split_path(b"./a/./b/").unwrap(), [&b"a"[..], b"b"]);
        assert!(split_path(b"./").unwrap().is_empty());
        assert!(matches!(
            split_path(b"a/../../x"),
            Err(PathError::DotDot(_))
        ));
        assert!(matches!(split_path(b"a\0b"), Err(PathError::Nul(_))));
        assert!(matches!(
            split_path(&[b'a'; 256]),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn make_dirs_replaces_a_symlink_instead_of_following_it() {
        let mut tree = Tree::new();
        let link = tree.add(Node {
            meta: Meta::default(),
            kind: Kind::Symlink(b"/etc".to_vec()),
        });
        tree.link(ROOT, b"lib", link, 0);
        let dir = tree.make_dirs(&[b"lib", b"x"], 0);
        assert!(matches!(tree.nodes[dir].kind, Kind::Dir(_)));
        let lib = tree.lookup(&[b"lib"]).unwrap();
        assert!(matches!(tree.nodes[lib].kind, Kind::Dir(_)));
        assert_eq!(tree.lookup(&[b"lib", b"x"]), Some(dir));
    }

    #[test]
    fn whiteouts_only_hide_lower_layers() {
        let mut tree = Tree::new();
        let (a, b) = (file(&mut tree), file(&mut tree));
        tree.link(ROOT, b"lower", a, 0);
        tree.link(ROOT, b"same", b, 1);
        tree.whiteout(ROOT, b"lower", 1);
        tree.whiteout(ROOT, b"same", 1);
        assert_eq!(tree.lookup(&[b"lower"]), None);
        assert_eq!(tree.lookup(&[b"same"]), Some(b));
        let c = file(&mut tree);
        tree.link(ROOT, b"again", c, 0);
        tree.make_opaque(ROOT, 1);
        assert_eq!(tree.lookup(&[b"again"]), None);
        assert_eq!(tree.lookup(&[b"same"]), Some(b));
    }
}
