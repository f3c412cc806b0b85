//! gRPC types and services for Tandem: the Open Inference Protocol v2
//! (`inference.GRPCInferenceService`, wire-compatible with KServe and Triton)
//! and Tandem's own `tandem.v1.WorkerControl`: generated code, and the codec it uses
//! ([`codec`]), which refuses a `ModelInferRequest` too costly to decode.

pub mod codec;

/// Open Inference Protocol v2 (`inference` package).
pub mod inference {
    tonic::include_proto!("inference");
}

/// Tandem's worker control service (`tandem.v1` package).
pub mod tandem {
    /// Version 1 of the control protocol.
    pub mod v1 {
        tonic::include_proto!("tandem.v1");
    }
}

/// Writes, inside an `impl GrpcInferenceService` block, the methods of Triton's extensions that
/// no Tandem server implements (loading models, shared memory, trace and log settings), each
/// answering `Err($status(rpc))` with the RPC's name: `triton_extensions!(|rpc| ...)`.
///
/// It writes the signatures `#[tonic::async_trait]` gives the trait's methods: the attribute
/// does not look inside macro calls, so an `async fn` written by a macro would not match.
#[macro_export]
macro_rules! triton_extensions {
    ($status:expr) => {
        $crate::triton_extensions!(@each $status;
            repository_model_load RepositoryModelLoad RepositoryModelLoadRequest RepositoryModelLoadResponse,
            repository_model_unload RepositoryModelUnload RepositoryModelUnloadRequest RepositoryModelUnloadResponse,
            system_shared_memory_status SystemSharedMemoryStatus SystemSharedMemoryStatusRequest SystemSharedMemoryStatusResponse,
            system_shared_memory_register SystemSharedMemoryRegister SystemSharedMemoryRegisterRequest SystemSharedMemoryRegisterResponse,
            system_shared_memory_unregister SystemSharedMemoryUnregister SystemSharedMemoryUnregisterRequest SystemSharedMemoryUnregisterResponse,
            cuda_shared_memory_status CudaSharedMemoryStatus CudaSharedMemoryStatusRequest CudaSharedMemoryStatusResponse,
            cuda_shared_memory_register CudaSharedMemoryRegister CudaSharedMemoryRegisterRequest CudaSharedMemoryRegisterResponse,
            cuda_shared_memory_unregister CudaSharedMemoryUnregister CudaSharedMemoryUnregisterRequest CudaSharedMemoryUnregisterResponse,
            trace_setting TraceSetting TraceSettingRequest TraceSettingResponse,
            log_settings LogSettings LogSettingsRequest LogSettingsResponse,
        );
    };
    (@each $status:expr; $($method:ident $rpc:ident $req:ident $resp:ident,)*) => {
        $(
            fn $method<'life0, 'async_trait>(
                &'life0 self,
                _: ::tonic::Request<$crate::inference::$req>,
            ) -> ::std::pin::Pin<
                ::std::boxed::Box<
                    dyn ::std::future::Future<
                            Output = ::std::result::Result<
                                ::tonic::Response<$crate::inference::$resp>,
                                ::tonic::Status,
                            >,
                        > + ::std::marker::Send
                        + 'async_trait,
                >,
            >
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                let status: ::tonic::Status = ($status)(stringify!($rpc));
                ::std::boxed::Box::pin(::std::future::ready(::std::result::Result::Err(status)))
            }
        )*
    };
}
