//! Maps a container image to a local binary, and a container's `command` to the argv to run.
//!
//! The rule (documented in `docs/node-agent.md`): the basename of the image repository (tag and
//! digest ignored) selects the binary. `tandem-testserver` runs this agent's own `testserver`
//! subcommand; every other `tandem-*` name runs `<bin-dir>/<name>`; anything else is not mapped.

use std::path::{Path, PathBuf};

/// Image repository basenames with this prefix map to the binary of the same name in `--bin-dir`.
pub const BIN_DIR_PREFIX: &str = "tandem-";

/// Image repository basename served by this agent's own `testserver` subcommand.
pub const TESTSERVER_IMAGE: &str = "tandem-testserver";

/// What an image runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedImage {
    /// Basename of the image repository, e.g. `tandem-worker`.
    pub name: String,
    /// The program to execute.
    pub program: PathBuf,
    /// Arguments placed before the container's own when the image's entrypoint is used.
    pub entrypoint_args: Vec<String>,
}

/// The image names no local binary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "image {image:?} is not mapped to a local binary: the node agent runs only images whose \
     repository basename is tandem-testserver (its own test server) or tandem-<name> \
     (<bin-dir>/tandem-<name>); the tag is ignored"
)]
pub struct ImageNotMapped {
    /// The image as written in the pod spec.
    pub image: String,
}

/// Returns the repository basename of an image reference: `reg:5000/a/tandem-worker:v1@sha256:..`
/// gives `tandem-worker`.
pub fn repository_basename(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    // A colon in the last path segment separates the tag (a registry port only appears earlier).
    last.split(':').next().unwrap_or(last)
}

/// Maps an image to the binary that runs it.
pub fn map_image(
    image: &str,
    bin_dir: &Path,
    self_exe: &Path,
) -> Result<MappedImage, ImageNotMapped> {
    let name = repository_basename(image);
    if name == TESTSERVER_IMAGE {
        return Ok(MappedImage {
            name: name.to_owned(),
            program: self_exe.to_path_buf(),
            entrypoint_args: vec!["testserver".to_owned()],
        });
    }
    if name.starts_with(BIN_DIR_PREFIX) && name.len() > BIN_DIR_PREFIX.len() {
        return Ok(MappedImage {
            name: name.to_owned(),
            program: bin_dir.join(name),
            entrypoint_args: Vec::new(),
        });
    }
    Err(ImageNotMapped {
        image: image.to_owned(),
    })
}

/// Builds the argv (program first) from the mapped image and the container's already expanded
/// `command` and `args`, following the Kubernetes entrypoint rules: `command` replaces the
/// entrypoint, `args` replaces the default arguments. A `command[0]` whose basename is the mapped
/// binary's name is replaced by the mapped program.
pub fn build_argv(mapped: &MappedImage, command: &[String], args: &[String]) -> Vec<String> {
    let mut argv: Vec<String> = Vec::new();
    if let Some((first, rest)) = command.split_first() {
        let first_base = first.rsplit('/').next().unwrap_or(first);
        if first_base == mapped.name {
            argv.push(mapped.program.to_string_lossy().into_owned());
            argv.extend(mapped.entrypoint_args.iter().cloned());
        } else {
            argv.push(first.clone());
        }
        argv.extend(rest.iter().cloned());
    } else {
        argv.push(mapped.program.to_string_lossy().into_owned());
        argv.extend(mapped.entrypoint_args.iter().cloned());
    }
    argv.extend(args.iter().cloned());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(image: &str) -> Result<MappedImage, ImageNotMapped> {
        map_image(image, Path::new("/bins"), Path::new("/agent"))
    }

    #[test]
    fn repository_basename_ignores_registry_port_path_tag_and_digest() {
        assert_eq!(repository_basename("tandem-worker"), "tandem-worker");
        assert_eq!(repository_basename("tandem-worker:latest"), "tandem-worker");
        assert_eq!(
            repository_basename("localhost:5000/x/tandem-worker:v1"),
            "tandem-worker"
        );
        assert_eq!(
            repository_basename("ghcr.io/a/tandem-operator@sha256:abc"),
            "tandem-operator"
        );
    }

    #[test]
    fn worker_and_operator_images_map_into_the_bin_dir() {
        let m = mapped("ghcr.io/tandem-dev/tandem-worker:0.1.0").expect("mapped");
        assert_eq!(m.program, PathBuf::from("/bins/tandem-worker"));
        let m = mapped("tandem-operator:latest").expect("mapped");
        assert_eq!(m.program, PathBuf::from("/bins/tandem-operator"));
    }

    #[test]
    fn testserver_image_runs_the_agents_own_subcommand() {
        let m = mapped("tandem-testserver:latest").expect("mapped");
        assert_eq!(
            build_argv(&m, &[], &["--port".into(), "9000".into()]),
            vec!["/agent", "testserver", "--port", "9000"]
        );
    }

    #[test]
    fn unknown_image_is_an_error_that_names_the_image_and_the_rule() {
        let err = mapped("nginx:1.27").expect_err("not mapped");
        let msg = err.to_string();
        assert!(msg.contains("nginx:1.27"), "{msg}");
        assert!(msg.contains("tandem-<name>"), "{msg}");
    }

    #[test]
    fn command_whose_first_word_is_the_image_binary_is_replaced_by_the_mapped_program() {
        let m = mapped("tandem-worker").expect("mapped");
        let argv = build_argv(
            &m,
            &["/usr/local/bin/tandem-worker".into(), "serve".into()],
            &["--port=1".into()],
        );
        assert_eq!(argv, vec!["/bins/tandem-worker", "serve", "--port=1"]);
    }

    #[test]
    fn other_commands_are_used_as_given() {
        let m = mapped("tandem-worker").expect("mapped");
        let argv = build_argv(&m, &["/bin/sh".into(), "-c".into(), "true".into()], &[]);
        assert_eq!(argv, vec!["/bin/sh", "-c", "true"]);
    }

    #[test]
    fn args_without_command_follow_the_mapped_program() {
        let m = mapped("tandem-worker").expect("mapped");
        assert_eq!(
            build_argv(&m, &[], &["--role".into(), "x".into()]),
            vec!["/bins/tandem-worker", "--role", "x"]
        );
    }
}
