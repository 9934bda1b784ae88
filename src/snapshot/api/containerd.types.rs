/// Mount describes mounts for a container.
///
/// This type is the lingua franca of ContainerD. All services provide mounts
/// to be used with the container at creation time.
///
/// The Mount type follows the structure of the mount syscall, including a type,
/// source, target and options.
#[allow(clippy::derive_partial_eq_without_eq)]
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Mount {
    /// Type defines the nature of the mount.
    #[prost(string, tag = "1")]
    pub r#type: ::prost::alloc::string::String,
    /// Source specifies the name of the mount. Depending on mount type, this
    /// may be a volume name or a host path, or even ignored.
    #[prost(string, tag = "2")]
    pub source: ::prost::alloc::string::String,
    /// Target path in container
    #[prost(string, tag = "3")]
    pub target: ::prost::alloc::string::String,
    /// Options specifies zero or more fstab style mount options.
    #[prost(string, repeated, tag = "4")]
    pub options: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
}
