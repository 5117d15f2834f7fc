//! Where a path really is: outputs must never equal, contain or lie inside
//! anything a conversion reads (spec/container.md §11).

use std::path::{Component, Path, PathBuf};

/// True for the URL schemes ckptkit reads and writes remotely (feature
/// `remote`): `s3://`, `gs://`, `az://`, `abfs://`, `http(s)://`, with
/// something after the scheme.
#[cfg(any(feature = "cli", feature = "remote"))]
pub fn is_url(s: &str) -> bool {
    ["s3://", "gs://", "az://", "abfs://", "http://", "https://"]
        .iter()
        .any(|p| s.len() > p.len() && s[..p.len()].eq_ignore_ascii_case(p))
}

/// The absolute, symlink-free form of `p`, for paths that may not exist
/// yet: the longest existing ancestor is canonicalized (resolving
/// symlinks), the rest is appended with `.` and `..` applied lexically.
pub fn resolve(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(p)
    };
    // split into the longest prefix that exists and the remainder
    let comps: Vec<Component> = abs.components().collect();
    for k in (0..=comps.len()).rev() {
        let prefix: PathBuf = comps[..k].iter().collect();
        if prefix.as_os_str().is_empty() {
            continue;
        }
        if let Ok(c) = prefix.canonicalize() {
            let mut out = c;
            for comp in &comps[k..] {
                match comp {
                    Component::CurDir => {}
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::Normal(n) => out.push(n),
                    Component::RootDir | Component::Prefix(_) => {}
                }
            }
            return out;
        }
    }
    abs
}

/// The resolved forms of an output path: where its name will be created
/// (its parent resolved, the name kept: a symlink at the output is itself
/// replaced) and, when something exists there, what it points to.
pub fn output_forms(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match p.file_name() {
        Some(n) => v.push(resolve(parent).join(n)),
        None => v.push(resolve(p)),
    }
    let full = resolve(p);
    if !v.contains(&full) {
        v.push(full);
    }
    v
}

/// True when `a` and `b` are the same path or one lies inside the other
/// (both resolved).
pub fn overlap(a: &Path, b: &Path) -> bool {
    a == b || a.starts_with(b) || b.starts_with(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_handles_missing_parents_dots_and_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("in")).unwrap();
        // a not-yet-existing child of the input is inside it
        let out = resolve(&root.join("in/sub/out.safetensors"));
        assert!(overlap(&out, &resolve(&root.join("in"))));
        assert_eq!(resolve(&root.join("in/sub/../x")), root.join("in/x"));
        // a symlink to the input resolves to it
        std::os::unix::fs::symlink(root.join("in"), root.join("link")).unwrap();
        assert_eq!(resolve(&root.join("link/new")), root.join("in/new"));
        // the output's own name is kept when it is a symlink...
        let forms = output_forms(&root.join("link"));
        assert!(forms.contains(&root.join("link")));
        // ...and what it points to is also checked
        assert!(forms.contains(&root.join("in")));
        assert!(!overlap(&root.join("a"), &root.join("ab")));
        assert!(overlap(&root.join("a"), &root.join("a/b")));
    }
}
