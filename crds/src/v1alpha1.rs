//! `InferenceDeployment` (`sparsemoe.io/v1alpha1`): one served model, on one or more GPU types.
//!
//! Every cross-field rule lives in the schema as a CEL `x-kubernetes-validations` rule, so the
//! API server rejects a bad object at `kubectl apply` time with a message that says how to fix
//! it; the same rules run client-side through [`InferenceDeployment::validate_cel`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cost::CostPerHour;

/// Default engine image; pin a digest in production.
pub const DEFAULT_ENGINE_IMAGE: &str = "ghcr.io/sparsemoe/sparsemoe-engine:v0.1.0";

/// The desired state of a served model.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sparsemoe.io",
    version = "v1alpha1",
    kind = "InferenceDeployment",
    namespaced,
    shortname = "idep",
    category = "sparsemoe",
    status = "InferenceDeploymentStatus",
    derive = "PartialEq",
    cel,
    doc = "A sparse-attention Mixture-of-Experts model served by sparsemoe-engine pods on one or more GPU types.",
    scale(
        spec_replicas_path = ".spec.scaling.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Variants", type_ = "string", json_path = ".spec.variants[*].name"),
    printcolumn(
        name = "Tokens/s",
        type_ = "number",
        json_path = ".status.lastScaling.metrics.tokensPerSecond"
    ),
    printcolumn(
        name = "$/Mtok",
        type_ = "number",
        json_path = ".status.lastScaling.metrics.costPerMillionTokens"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40").message(
        "metadata.name must be at most 40 characters: child objects are named <name>-<variant> and must stay valid DNS labels"
    ),
    validation = Rule::new(
        "self.spec.variants.all(v, (has(v.nodesPerReplica) ? v.nodesPerReplica : self.spec.parallelism.nodesPerReplica) <= 1 || size(self.metadata.name) + size(v.name) <= 47)"
    ).message(
        "a multi-node variant's workload <name>-<variant> must be at most 48 characters: its LeaderWorkerSet's StatefulSets and pods add suffixes, and their labels and hostnames must stay within 63; shorten metadata.name or the variant's name"
    ),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message(
        "metadata.name must be lowercase letters, digits and '-', beginning with a letter (no dots, e.g. deepseek-v32 rather than deepseek-v3.2): it names the Service, whose name is a DNS label"
    ),
)]
#[x_kube(
    validation = Rule::new(
        "self.variants.all(v, (has(v.gpusPerReplica) ? v.gpusPerReplica : self.parallelism.gpusPerReplica) % (has(v.nodesPerReplica) ? v.nodesPerReplica : self.parallelism.nodesPerReplica) == 0)"
    ).message(
        "each variant's gpusPerReplica must be a multiple of its nodesPerReplica: a replica spreads its GPUs evenly over its nodes"
    ),
    validation = Rule::new(
        "!self.parallelism.expertParallel.enabled || self.variants.all(v, (has(v.gpusPerReplica) ? v.gpusPerReplica : self.parallelism.gpusPerReplica) >= 1)"
    ).message(
        "parallelism.expertParallel needs GPUs: set gpusPerReplica >= 1 (on the variant or in parallelism), or disable expertParallel"
    ),
    validation = Rule::new(
        "!has(self.engine.dtype) || self.engine.dtype == 'float32' || self.variants.all(v, (has(v.gpusPerReplica) ? v.gpusPerReplica : self.parallelism.gpusPerReplica) >= 1)"
    ).message(
        "engine.dtype bfloat16 needs GPUs (the CPU engine computes in float32): set gpusPerReplica >= 1 on every variant, or drop engine.dtype"
    ),
    validation = Rule::new(
        "!has(self.engine.cudaGraphRows) || self.engine.cudaGraphRows == 0 || self.variants.all(v, (has(v.gpusPerReplica) ? v.gpusPerReplica : self.parallelism.gpusPerReplica) >= 1)"
    ).message(
        "engine.cudaGraphRows needs GPUs (the CPU engine has no CUDA graphs): set gpusPerReplica >= 1 on every variant, or drop engine.cudaGraphRows"
    ),
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceDeploymentSpec {
    /// The model to serve and where its files come from.
    pub model: ModelSpec,
    /// Engine container settings.
    #[serde(default)]
    pub engine: EngineSpec,
    /// How one replica spreads over GPUs and nodes.
    #[serde(default)]
    pub parallelism: ParallelismSpec,
    /// The GPU types this deployment may run on, in order of preference.
    #[x_kube(
        validation = Rule::new("size(self) >= 1").message("variants: list at least one GPU variant (name, nodeSelector, costPerHour)"),
        validation = Rule::new("self.all(v, self.exists_one(w, w.name == v.name))").message("variants: names must be unique; rename the duplicate variant"),
    )]
    #[schemars(length(max = 8))]
    pub variants: Vec<GpuVariant>,
    /// How many replicas run, and how that number is chosen.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// How a spec change rolls out.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// The served model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The name clients pass as `model` in OpenAI requests.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._/:-]*$')").message(
        "model.name must start with a letter or digit and use only letters, digits and . _ / : -"
    ))]
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// Where the Hugging Face model directory (config.json, *.safetensors, tokenizer.json) is.
    pub source: ModelSource,
    /// The model revision (e.g. a Hugging Face commit); informational: the engine shows it in its
    /// `sparsemoe_model_info` metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub revision: Option<String>,
}

/// Where the model files come from: exactly one of the fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new(
    "[has(self.pvc), has(self.hostPath), has(self.image), has(self.demo)].filter(x, x).size() == 1"
).message("model.source: set exactly one of pvc, hostPath, image or demo"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// A PersistentVolumeClaim holding the model directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// A directory on the node (pre-staged weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    /// An OCI image whose filesystem is the model directory (Kubernetes image volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// The engine's built-in demo model: no files, no GPU needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demo: Option<DemoSource>,
}

/// A model directory on a PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// The claim's name, in the InferenceDeployment's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// The model directory inside the volume; empty for the volume root.
    #[serde(default)]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message(
        "model.source.pvc.path must be relative to the volume root and must not contain '..'"
    ))]
    #[schemars(length(max = 4096))]
    pub path: String,
}

/// A model directory on the node's filesystem.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    /// Absolute path on the node.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message(
        "model.source.hostPath.path must be an absolute path such as /models/deepseek-v3.2"
    ))]
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

/// A model packaged as an OCI image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// Image reference, ideally pinned by digest.
    #[schemars(length(min = 1, max = 512))]
    pub reference: String,
    /// Image pull policy for the model image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

/// The engine's built-in demo model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct DemoSource {}

/// Kubernetes image pull policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The engine container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(
    "!has(self.kvCacheMemoryFraction) || !has(self.args) || \
     !self.args.exists(a, a == '--kv-cache-bytes' || a.startsWith('--kv-cache-bytes='))"
).message(
    "engine.kvCacheMemoryFraction and --kv-cache-bytes in engine.args both size the KV cache: give one"
))]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// The sparsemoe-engine image.
    #[serde(default = "default_engine_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Image pull policy for the engine image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Sparse (DSA top-k) or dense attention.
    #[serde(default)]
    pub attention: AttentionSpec,
    /// Overrides the model's `index_topk`: how many earlier tokens each query attends to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("engine.indexTopK must be at least 1"))]
    #[schemars(range(max = u32::MAX))]
    pub index_top_k: Option<u32>,
    /// Longest prompt + completion the engine accepts; defaults to the model's limit. The
    /// engine refuses to start with more than the model's limit, and serves what its KV cache
    /// holds when that is less (a variant with less GPU memory serves shorter sequences).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 16").message("engine.maxContextTokens must be at least 16"))]
    #[schemars(range(max = u32::MAX))]
    pub max_context_tokens: Option<u32>,
    /// Token budget of one scheduler step (prefill chunks + decodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 16").message("engine.maxBatchedTokens must be at least 16"))]
    #[schemars(range(max = u32::MAX))]
    pub max_batched_tokens: Option<u32>,
    /// Share of available memory given to the KV cache, in (0, 0.98]: the accelerator's free
    /// memory on GPU replicas, the container's available memory less the weights on CPU ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 0.98").message(
        "engine.kvCacheMemoryFraction must be in (0, 0.98], e.g. 0.9"
    ))]
    pub kv_cache_memory_fraction: Option<f64>,
    /// How the engine keeps weights on the GPU: `float32` (the default) or `bfloat16` (half
    /// the memory, tensor-core products; fp8 checkpoints stay fp8). GPU replicas only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<WeightDtype>,
    /// How the engine stores the KV cache: `auto` (the default: `bfloat16` with
    /// `dtype: bfloat16`, else `float32`), `float32`, `bfloat16` (half the bytes, so twice the
    /// tokens in the same memory), or `fp8` (e4m3 with a scale per 128 values, RoPE keys in
    /// bf16: about a quarter of the float32 bytes; power-of-two scales where the checkpoint
    /// says `scale_fmt: ue8m0`). CPU and GPU replicas alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// Reuse the KV blocks of a prompt prefix computed before (automatic prefix caching); on
    /// unless `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_caching: Option<bool>,
    /// Decode steps of at most this many tokens replay each layer's MLP block as a CUDA graph
    /// (`sparsemoe-engine serve --cuda-graph-rows`): fewer kernel launches for the host to
    /// issue a step. 0 (the default) turns graphs off; at most 64. GPU replicas only; replicas
    /// whose experts are sharded over several GPUs run without graphs for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 64").message(
        "engine.cudaGraphRows must be at most 64: longer steps copy to the host, which a graph cannot replay"
    ))]
    #[schemars(range(max = 64))]
    pub cuda_graph_rows: Option<u32>,
    /// Extra arguments appended to `sparsemoe-engine serve` (at most 64, each at most 4096
    /// bytes: the bounds keep the schema's rules within the API server's cost budget). Not
    /// `--model`, `--device`, `--host` or `--port`: the operator passes those, and the engine
    /// refuses a flag given twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new(
        "!self.exists(a, a in ['--model', '--device', '--host', '--port'] || \
         a.startsWith('--model=') || a.startsWith('--device=') || \
         a.startsWith('--host=') || a.startsWith('--port='))"
    ).message(
        "engine.args must not set --model, --device, --host or --port: the operator passes them to the engine, which exits when a flag is given twice; --model comes from model.source, --device from gpusPerReplica (in parallelism or the variant), and --host 0.0.0.0 and --port 8000 are fixed, as the Service and the probes use them"
    ))]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Vec<String>,
    /// Extra environment variables for the engine container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// The engine container's resources; the GPUs of `parallelism.gpusPerReplica` are always
    /// added (`nvidia.com/gpu`). Unset: no CPU or memory requests or limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Secrets (in the object's namespace) the kubelet pulls the engine image and an `image`
    /// model source with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// The engine pods' PriorityClass, so serving can preempt batch work on the GPU nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// The engine pods' RuntimeClass (e.g. `nvidia`, where the NVIDIA container runtime is
    /// not the nodes' default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
}

fn default_engine_image() -> String {
    DEFAULT_ENGINE_IMAGE.to_string()
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self {
            image: default_engine_image(),
            image_pull_policy: None,
            attention: AttentionSpec::default(),
            index_top_k: None,
            max_context_tokens: None,
            max_batched_tokens: None,
            kv_cache_memory_fraction: None,
            dtype: None,
            kv_cache_dtype: None,
            prefix_caching: None,
            cuda_graph_rows: None,
            args: Vec::new(),
            env: Vec::new(),
            resources: None,
            image_pull_secrets: Vec::new(),
            priority_class_name: None,
            runtime_class_name: None,
        }
    }
}

/// Which attention the engine runs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("self.mode == 'auto' || !has(self.denseBelowTokens)").message(
    "engine.attention.denseBelowTokens only applies to mode: auto; remove it or set mode: auto"
))]
#[serde(rename_all = "camelCase")]
pub struct AttentionSpec {
    /// `sparse` (DSA top-k), `dense` (every earlier token), or `auto` (dense for short contexts).
    #[serde(default)]
    pub mode: AttentionMode,
    /// With `auto`: contexts shorter than this many tokens use dense attention; defaults to indexTopK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("engine.attention.denseBelowTokens must be at least 1"))]
    #[schemars(range(max = u32::MAX))]
    pub dense_below_tokens: Option<u32>,
}

/// How the engine keeps weights on the GPU (`sparsemoe-engine serve --dtype`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    Float32,
    Bfloat16,
}

impl WeightDtype {
    /// The engine's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Bfloat16 => "bfloat16",
        }
    }
}

/// How the engine stores the KV cache (`sparsemoe-engine serve --kv-cache-dtype`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    Auto,
    Float32,
    Bfloat16,
    Fp8,
}

impl KvCacheDtype {
    /// The engine's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Float32 => "float32",
            Self::Bfloat16 => "bfloat16",
            Self::Fp8 => "fp8",
        }
    }
}

/// Attention mode.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum AttentionMode {
    Sparse,
    Dense,
    #[default]
    Auto,
}

/// How one replica spreads over GPUs and nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.expertParallel.enabled || self.expertParallel.redundantExperts == 0").message(
    "parallelism.expertParallel.redundantExperts needs expertParallel.enabled: true"
))]
#[serde(rename_all = "camelCase")]
pub struct ParallelismSpec {
    /// GPUs per replica (0: CPU only); a variant may override it.
    #[serde(default = "one")]
    #[schemars(range(max = 64))]
    pub gpus_per_replica: u32,
    /// Nodes per replica; more than one runs the replica as a LeaderWorkerSet.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("parallelism.nodesPerReplica must be between 1 and 64"))]
    #[schemars(range(max = 64))]
    pub nodes_per_replica: u32,
    /// Spread routed experts over the replica's GPUs.
    #[serde(default)]
    pub expert_parallel: ExpertParallelSpec,
}

fn one() -> u32 {
    1
}

impl Default for ParallelismSpec {
    fn default() -> Self {
        Self {
            gpus_per_replica: 1,
            nodes_per_replica: 1,
            expert_parallel: ExpertParallelSpec::default(),
        }
    }
}

/// Routed experts per layer when `numExperts` is unset (DeepSeek-V3 / V3.2).
pub const DEFAULT_NUM_EXPERTS: u32 = 256;

/// Expert parallelism.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExpertParallelSpec {
    /// Shard routed experts across GPUs by the placement plan.
    #[serde(default)]
    pub enabled: bool,
    /// Routed experts per MoE layer of the model (`n_routed_experts` in config.json); the
    /// placement plan covers experts `0..numExperts`. Unset: 256, as in DeepSeek-V3 and V3.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4096").message(
        "parallelism.expertParallel.numExperts must be between 1 and 4096 (n_routed_experts of the model)"
    ))]
    #[schemars(range(max = 4096))]
    pub num_experts: Option<u32>,
    /// Extra expert slots per replica for copies of hot experts.
    #[serde(default)]
    #[schemars(range(max = 1024))]
    pub redundant_experts: u32,
    /// How often the placement is to be recomputed from measured expert load. Reserved: the
    /// operator does not rebalance yet (the placement is `plan-experts`' or the balanced default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 60").message(
        "parallelism.expertParallel.rebalanceIntervalSeconds must be at least 60 (a rebalance moves weights)"
    ))]
    #[schemars(range(max = u32::MAX))]
    pub rebalance_interval_seconds: Option<u32>,
}

impl ExpertParallelSpec {
    /// Routed experts per MoE layer: `numExperts`, or [`DEFAULT_NUM_EXPERTS`].
    pub fn experts(&self) -> u32 {
        self.num_experts.unwrap_or(DEFAULT_NUM_EXPERTS)
    }
}

/// A GPU type this deployment may run on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuVariant {
    /// Short name, used in child object names (`<deployment>-<variant>`).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message(
        "variants[].name must be a lowercase DNS label such as h200 or h100-sxm"
    ))]
    #[schemars(length(min = 1, max = 20))]
    pub name: String,
    /// Node labels that select this GPU type, e.g. `nvidia.com/gpu.product: NVIDIA-H200`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the GPU nodes' taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// GPUs per replica on this type; defaults to parallelism.gpusPerReplica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 64))]
    pub gpus_per_replica: Option<u32>,
    /// Nodes per replica on this type; defaults to parallelism.nodesPerReplica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("variants[].nodesPerReplica must be between 1 and 64"))]
    #[schemars(range(max = 64))]
    pub nodes_per_replica: Option<u32>,
    /// Price of one replica of this variant per hour, in the user's currency: a decimal
    /// string such as "31.50" (quote fractional values) or a whole number.
    pub cost_per_hour: CostPerHour,
    /// The most replicas this variant can hold (its GPU capacity); unset: unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub max_replicas: Option<u32>,
    /// Generated tokens per second one replica of this variant delivers with its batch full
    /// (from a benchmark of this model on this GPU type). The costAware policy ranks variants
    /// by it, per unit of costPerHour, until it has measured them; unset, a variant not
    /// measured yet keeps its place in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("variants[].expectedTokensPerSecond must be at least 1"))]
    #[schemars(range(max = 100_000_000))]
    pub expected_tokens_per_second: Option<u32>,
}

impl GpuVariant {
    /// GPUs one replica of this variant uses.
    pub fn gpus(&self, parallelism: &ParallelismSpec) -> u32 {
        self.gpus_per_replica
            .unwrap_or(parallelism.gpus_per_replica)
    }

    /// Nodes one replica of this variant spans (more than one: a LeaderWorkerSet).
    pub fn nodes(&self, parallelism: &ParallelismSpec) -> u32 {
        self.nodes_per_replica
            .unwrap_or(parallelism.nodes_per_replica)
    }
}

/// How the replica count is chosen.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.policy == 'fixed' || has(self.maxReplicas)").message(
        "scaling.maxReplicas is required for policy queueDepth and costAware"
    ),
    validation = Rule::new("!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message(
        "scaling.minReplicas must be less than or equal to scaling.maxReplicas"
    ),
    validation = Rule::new("self.policy == 'fixed' || self.minReplicas >= 1").message(
        "scaling.minReplicas 0 is not supported by autoscaling policies (they measure running replicas); set minReplicas >= 1, or use policy fixed with replicas 0 to pause"
    ),
)]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// `fixed` (replicas below, or the /scale subresource), `queueDepth` (as many replicas
    /// as the engines' queues call for, added to the variants in listed order), or
    /// `costAware` (as many, added to the variant that serves the most tokens per second per
    /// unit of costPerHour and taken from the one that serves the fewest per unit, as measured
    /// on the engines with their batches full or, until measured, as
    /// variants[].expectedTokensPerSecond says).
    #[serde(default)]
    pub policy: ScalingPolicy,
    /// Replicas for policy `fixed`; the /scale subresource (HPA, KEDA, kubectl scale) sets it.
    #[serde(default = "one")]
    #[schemars(range(max = 1000))]
    pub replicas: u32,
    /// Fewest replicas an autoscaling policy keeps.
    #[serde(default = "one")]
    #[schemars(range(max = 1000))]
    pub min_replicas: u32,
    /// Most replicas an autoscaling policy may run; required for queueDepth and costAware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("scaling.maxReplicas must be between 1 and 1000"))]
    #[schemars(range(max = 1000))]
    pub max_replicas: Option<u32>,
    /// Waiting requests per replica the queueDepth and costAware policies aim for: they run
    /// the waiting requests of every ready engine (`sparsemoe_num_requests_waiting`), summed,
    /// divided by this, rounded up, and never fewer replicas than keep the running requests
    /// in the engines' slots.
    #[serde(default = "default_target_queue_depth")]
    #[x_kube(validation = Rule::new("self >= 1").message("scaling.targetQueueDepthPerReplica must be at least 1"))]
    #[schemars(range(max = u32::MAX))]
    pub target_queue_depth_per_replica: u32,
    /// Latency objectives the autoscaler is to keep. Reserved: not acted on yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
    /// How long a higher recommendation must hold before scaling up (queueDepth,
    /// costAware): a scale-up goes to the lowest recommendation of this window.
    #[serde(default)]
    #[schemars(range(max = 3600))]
    pub scale_up_stabilization_seconds: u32,
    /// How long a lower recommendation must hold before scaling down (queueDepth,
    /// costAware): a scale-down goes to the highest recommendation of this window.
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(max = 86400))]
    pub scale_down_stabilization_seconds: u32,
}

fn default_target_queue_depth() -> u32 {
    4
}

fn default_scale_down_stabilization() -> u32 {
    300
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            policy: ScalingPolicy::default(),
            replicas: 1,
            min_replicas: 1,
            max_replicas: None,
            target_queue_depth_per_replica: default_target_queue_depth(),
            slo: None,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: default_scale_down_stabilization(),
        }
    }
}

/// Autoscaling policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum ScalingPolicy {
    #[default]
    Fixed,
    QueueDepth,
    CostAware,
}

impl ScalingPolicy {
    /// The policy as the spec spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ScalingPolicy::Fixed => "fixed",
            ScalingPolicy::QueueDepth => "queueDepth",
            ScalingPolicy::CostAware => "costAware",
        }
    }
}

/// Latency objectives, in milliseconds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SloSpec {
    /// Time to first token, at the 90th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("scaling.slo.timeToFirstTokenMs must be a positive number of milliseconds"))]
    #[schemars(range(max = u32::MAX))]
    pub time_to_first_token_ms: Option<u32>,
    /// Time per output token, at the 90th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("scaling.slo.timePerOutputTokenMs must be a positive number of milliseconds"))]
    #[schemars(range(max = u32::MAX))]
    pub time_per_output_token_ms: Option<u32>,
}

/// How a spec change rolls out across replicas.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(
    "!(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])"
).message("rollout: maxSurge and maxUnavailable cannot both be 0, or a rollout could never make progress"))]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Extra replicas a rollout may start above the desired count (needs spare GPUs).
    #[serde(default = "default_max_surge")]
    pub max_surge: IntOrString,
    /// Replicas a rollout may take down below the desired count.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrString,
}

fn default_max_surge() -> IntOrString {
    IntOrString::Int(1)
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(0)
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_surge: default_max_surge(),
            max_unavailable: default_max_unavailable(),
        }
    }
}

/// The observed state, written only by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferenceDeploymentStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Ready, Progressing, Degraded, ScalingActive; Reconciling, Stalled (kstatus).
    /// One per type: a map list keyed by `type`, as Kubernetes' own conditions are, so that
    /// server-side apply merges another writer's condition types instead of replacing them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Engine pods across all variants.
    #[serde(default)]
    pub replicas: i32,
    /// Engine pods passing readiness.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Engine pods running the current spec.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Label selector of the engine pods (for the /scale subresource and HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Per-variant replica counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantStatus>,
    /// The most recent decision of a metric policy (queueDepth, costAware) whose replicas per
    /// variant differ from the one before, with what the engines served when it was made
    /// (the Tokens/s and $/Mtok columns show those figures, not live ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scaling: Option<ScalingDecision>,
    /// The expert placement plan in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    /// In-cluster URL of the OpenAI-compatible API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// One variant's replicas.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VariantStatus {
    pub name: String,
    /// Replicas the operator asks for.
    pub desired_replicas: i32,
    pub replicas: i32,
    pub ready_replicas: i32,
    pub updated_replicas: i32,
}

/// A scaling decision and what it was based on.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecision {
    /// Total replicas decided.
    pub replicas: i32,
    /// Replicas per variant.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, i32>,
    /// Why, in words.
    pub reason: String,
    /// The metrics the decision used.
    #[serde(default)]
    pub metrics: ScalingMetrics,
    /// When the decision was made (changes only when the decision does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// Metrics behind a scaling decision.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScalingMetrics {
    /// Waiting requests, summed over the engines read.
    pub queue_depth: f64,
    /// Generated tokens per second, summed over the engines read twice (over the last
    /// interval between two reads of each).
    pub tokens_per_second: f64,
    /// tokensPerSecond per unit of costPerHour (of the engines with a rate).
    pub tokens_per_second_per_dollar: f64,
    /// The costPerHour of the engines with a rate, per million tokens at that rate; unset
    /// while nothing was generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_million_tokens: Option<f64>,
}

/// The placement plan in use.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// Content hash of the plan (see `PlacementPlan::hash`).
    pub hash: String,
    /// Mean over max GPU load (1.0 is perfectly balanced), when loads are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancedness: Option<f64>,
    /// The ConfigMap holding the plan.
    pub config_map: String,
}
