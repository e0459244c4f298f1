// What the header says about the model's build, from /v1/models' quantization,
// precision and kv_cache (the manifest's fields, see model_files.Build): a
// short label ("fp32", "int8 weights", "int8 weights · int8 KV") and a
// sentence for its tooltip. The raw quantization "none" meant nothing to a
// newcomer.

const WEIGHTS = {
  none: null,  // not quantized: the label is the precision alone
  int8: ["int8 weights", "8-bit integers, quantized from the fp32 export"],
  int4: ["int4 weights", "4-bit integers, quantized from the fp32 export"],
  source: ["GGUF-level weights", "the GGUF source's own quantized levels, repacked without re-quantizing"],
};

/** {label, title} for a /v1/models entry. */
export function describeBuild({ quantization, precision, kv_cache: kvCache }) {
  precision ??= "fp32";
  const kv = kvCache === "int8" ? "int8" : precision;  // "auto": the KV cache has the activations' type
  const weights = quantization in WEIGHTS ? WEIGHTS[quantization] : [`${quantization} weights`, quantization];
  const parts = weights ? [weights[0], ...(precision === "fp32" ? [] : [precision])] : [precision];
  if (kvCache === "int8") parts.push("int8 KV");
  const flags = [`--quantize ${quantization}`, ...(precision === "fp32" ? [] : [`--precision ${precision}`]),
    ...(kvCache === "int8" ? ["--kv-cache int8"] : [])].join(" ");
  const title = `The build this server runs: weights ${weights ? weights[1] : `${precision}, not quantized`}; ` +
    `activations ${precision}; KV cache ${kv}. Made by \`streamgen pull ${flags}\`.`;
  return { label: parts.join(" · "), title };
}
