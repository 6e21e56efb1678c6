// Loading, checking and running a bundle with MLX (see bundle.h and docs/embedding.md).
#include "bundle.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "mlx/mlx.h"

namespace mx = mlx::core;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace pgedge {
namespace {

constexpr const char* kFormat = "pg-edge-bundle";
constexpr int kFormatVersion = 2;
constexpr uintmax_t kMaxManifestBytes = 64ull << 20;
constexpr uintmax_t kMaxGraphBytes = 1ull << 30;
constexpr uintmax_t kMaxTokenizerBytes = 64ull << 20;
constexpr const char* kEmbed = "language_model.model.embed_tokens.weight";

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

// A file the manifest names: a plain name (no folder, no ".."), a regular file (a FIFO or a
// device such as /dev/zero is refused before it is opened) that resolves inside the bundle,
// at most max_bytes (0: no limit).
fs::path bundle_file(const fs::path& dir, const json& name, const std::string& what, uintmax_t max_bytes) {
  if (!name.is_string()) fail("manifest.json: " + what + " must be a file name");
  std::string s = name.get<std::string>();
  fs::path p(s);
  if (s.empty() || s == "." || s == ".." || p.has_parent_path() || p.is_absolute() || s.find('\0') != std::string::npos)
    fail("manifest.json: " + what + " \"" + s + "\" is not a plain file name inside the bundle");
  fs::path f = dir / p;
  std::error_code ec;
  if (!fs::exists(f, ec)) fail("bundle file missing: " + f.string());
  if (!fs::is_regular_file(f, ec)) fail(f.string() + " is not a regular file (a FIFO, device or folder?)");
  fs::path real = fs::canonical(f, ec), home = fs::canonical(dir, ec);
  if (ec || real.parent_path() != home) fail(f.string() + " leads out of the bundle (a symbolic link?)");
  uintmax_t size = fs::file_size(f, ec);
  if (ec) fail("cannot read " + f.string() + ": " + ec.message());
  if (max_bytes && size > max_bytes)
    fail(f.string() + " is " + std::to_string(size) + " bytes, more than a " + what + " can be (" +
         std::to_string(max_bytes) + ")");
  return f;
}

// A manifest integer within int's range (nlohmann's get<int> would silently wrap 2^40 to 0).
int as_int(const json& j, const std::string& what) {
  if (!j.is_number_integer() || j.get<long long>() < INT32_MIN || j.get<long long>() > INT32_MAX ||
      (j.is_number_unsigned() && j.get<unsigned long long>() > static_cast<unsigned long long>(INT32_MAX)))
    fail("manifest.json: " + what + " must be an integer (32-bit), got " + j.dump().substr(0, 40));
  return j.get<int>();
}

std::vector<int> as_ints(const json& j, const std::string& what) {
  if (!j.is_array()) fail("manifest.json: " + what + " must be a list of integers");
  std::vector<int> out;
  for (const auto& v : j) out.push_back(as_int(v, what));
  return out;
}

// Refuse an id outside [0, limit): it would index past the embedding (or the logits).
void check_id(const std::string& name, long long id, long long limit, const std::string& what) {
  if (id < 0 || id >= limit)
    fail("manifest.json: tokenizer." + name + " " + std::to_string(id) + " is outside the " + what + " (0.." +
         std::to_string(limit - 1) + ")");
}

std::string fnv1a64(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> data{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  uint64_t h = 0xCBF29CE484222325ull;
  for (char c : data) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001B3ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string dtype_name(mx::Dtype d) {
  static const std::map<mx::Dtype::Val, std::string> names = {
      {mx::Dtype::Val::bool_, "bool"},       {mx::Dtype::Val::uint8, "uint8"},
      {mx::Dtype::Val::uint16, "uint16"},    {mx::Dtype::Val::uint32, "uint32"},
      {mx::Dtype::Val::uint64, "uint64"},    {mx::Dtype::Val::int8, "int8"},
      {mx::Dtype::Val::int16, "int16"},      {mx::Dtype::Val::int32, "int32"},
      {mx::Dtype::Val::int64, "int64"},      {mx::Dtype::Val::float16, "float16"},
      {mx::Dtype::Val::float32, "float32"},  {mx::Dtype::Val::float64, "float64"},
      {mx::Dtype::Val::bfloat16, "bfloat16"}, {mx::Dtype::Val::complex64, "complex64"}};
  auto it = names.find(d.val());
  return it == names.end() ? "?" : it->second;
}

json read_manifest(const fs::path& dir) {
  fs::path f = dir / "manifest.json";
  if (!fs::is_directory(dir)) fail(dir.string() + " is not a folder");
  if (!fs::exists(f)) fail(dir.string() + " is not a pg-edge bundle (no manifest.json; make one with pg-edge export)");
  bundle_file(dir, "manifest.json", "manifest", kMaxManifestBytes);
  std::ifstream in(f);
  json m = json::parse(in, nullptr, false);
  if (m.is_discarded() || !m.is_object()) fail(f.string() + " is not valid JSON");
  if (m.value("format", "") != kFormat) fail(f.string() + " is not a pg-edge bundle manifest");
  if (m.value("format_version", 0) != kFormatVersion)
    fail("bundle format version " + std::to_string(m.value("format_version", 0)) + " is not supported (this runner reads " +
         std::to_string(kFormatVersion) + ")");
  return m;
}

}  // namespace

struct Runner::Impl {
  json m;
  Manifest man;
  std::optional<mx::ImportedFunction> encode, prefill, decode;
  mx::Kwargs vision_w, decoder_w;

  Impl(const std::string& dir, json manifest);
  mx::ImportedFunction load_fn(const std::string& name) const;
  void check_sizes(const std::string& name, const json& shapes) const;
  void load_weights();
};

Runner::Impl::Impl(const std::string& dir, json manifest) : m(std::move(manifest)) {
  man.dir = dir;
  man.bundle_id = m.at("bundle_id").get<std::string>();
  man.mlx_version = m.value("mlx_version", "?");
  man.image_size = as_int(m.at("image").at("size"), "image.size");
  const json& p = m.at("prompt");
  man.num_image_tokens = as_int(p.at("num_image_tokens"), "prompt.num_image_tokens");
  man.max_prompt_tokens = as_int(p.at("max_prompt_tokens"), "prompt.max_prompt_tokens");
  man.max_context = as_int(m.at("cache").at("max_context"), "cache.max_context");
  man.prompt_lengths = as_ints(m.at("functions").at("prefill").at("prompt_lengths"), "prefill.prompt_lengths");
  std::sort(man.prompt_lengths.begin(), man.prompt_lengths.end());
  if (man.prompt_lengths.empty() || man.prompt_lengths.back() != man.max_prompt_tokens)
    fail("manifest.json: prefill.prompt_lengths must end at max_prompt_tokens");
  const json& t = m.at("tokenizer");
  man.vocab_size = as_int(t.at("vocab_size"), "tokenizer.vocab_size");
  man.ids.bos = as_int(t.at("bos_id"), "tokenizer.bos_id");
  man.ids.eos = as_int(t.at("eos_id"), "tokenizer.eos_id");
  man.ids.pad = as_int(t.at("pad_id"), "tokenizer.pad_id");
  man.ids.image = as_int(t.at("image_id"), "tokenizer.image_id");
  man.ids.newline = as_ints(t.at("newline_ids"), "tokenizer.newline_ids");
  man.tokenizer_file = bundle_file(dir, t.at("file"), "tokenizer", kMaxTokenizerBytes).string();
  encode.emplace(load_fn("encode"));
  prefill.emplace(load_fn("prefill"));
  decode.emplace(load_fn("decode"));
  // The token ids against the embedding the graphs index (its rows, from the manifest's weight
  // list, which load_weights then holds the file to) and the logits they return.
  const json& embed = m.at("weights").at("tensors").at(kEmbed).at("shape");
  if (!embed.is_array() || embed.size() != 2) fail(std::string("manifest.json: ") + kEmbed + " must be a matrix");
  man.embed_rows = as_int(embed.at(0), std::string(kEmbed) + " rows");
  if (man.vocab_size < 1 || man.vocab_size > man.embed_rows)
    fail("manifest.json: tokenizer.vocab_size " + std::to_string(man.vocab_size) + " is outside 1.." +
         std::to_string(man.embed_rows) + " (the embedding's rows)");
  check_id("bos_id", man.ids.bos, man.embed_rows, "embedding");
  check_id("pad_id", man.ids.pad, man.embed_rows, "embedding");
  check_id("image_id", man.ids.image, man.embed_rows, "embedding");
  check_id("eos_id", man.ids.eos, man.vocab_size, "vocabulary");
  if (man.ids.newline.empty()) fail("manifest.json: tokenizer.newline_ids is empty");
  for (int id : man.ids.newline) check_id("newline_ids", id, man.embed_rows, "embedding");
  load_weights();
}

// The manifest's sizes must be those the graph was traced for (its own metadata, inside the
// checksummed file): a larger max_context or image size would make MLX read and write past
// the arrays the graph allocates.
void Runner::Impl::check_sizes(const std::string& name, const json& shapes) const {
  const json& lengths = m.at("functions").at("prefill").at("prompt_lengths");
  const std::pair<const char*, json> want[] = {
      {"image_size", man.image_size}, {"num_image_tokens", man.num_image_tokens},
      {"max_prompt_tokens", man.max_prompt_tokens}, {"prompt_lengths", lengths},
      {"max_context", man.max_context}, {"vocab_size", man.vocab_size},
      {"cache_shape", m.at("cache").at("shape")}};
  if (!shapes.is_object()) fail(name + ".mlxfn has no record of its sizes (exported by an older pg-edge? re-export it)");
  for (const auto& [key, value] : want) {
    if (!shapes.contains(key) || shapes.at(key) != value)
      fail("manifest.json says " + std::string(key) + " " + value.dump() + ", but " + name + ".mlxfn was traced for " +
           (shapes.contains(key) ? shapes.at(key).dump() : std::string("nothing")) + " (the manifest was edited?)");
  }
}

mx::ImportedFunction Runner::Impl::load_fn(const std::string& name) const {
  const json& spec = m.at("functions").at(name);
  fs::path f = bundle_file(man.dir, spec.at("file"), "graph", kMaxGraphBytes);
  if (fs::file_size(f) != spec.at("bytes").get<uintmax_t>() || fnv1a64(f) != spec.at("fnv1a64").get<std::string>())
    fail(f.filename().string() + " does not match manifest.json (size or checksum): the file is damaged or from another bundle");
  std::optional<mx::ImportedFunction> fn;
  try {
    fn.emplace(mx::import_function(f.string()));
  } catch (const std::exception& e) {
    fail("cannot import " + f.filename().string() + " (exported with MLX " + man.mlx_version + ", this is MLX " +
         mx::version() + "): " + e.what());
  }
  json meta = json::parse(fn->metadata(), nullptr, false);
  if (meta.is_discarded() || !meta.is_object() || meta.value("bundle_id", "") != man.bundle_id)
    fail(f.filename().string() + " belongs to another bundle (another model?) than manifest.json");
  check_sizes(name, meta.contains("shapes") ? meta.at("shapes") : json());
  return *fn;
}

void Runner::Impl::load_weights() {
  fs::path f = bundle_file(man.dir, m.at("weights").at("file"), "weights file", 0);
  mx::SafetensorsLoad loaded;
  try {
    loaded = mx::load_safetensors(f.string());
  } catch (const std::exception& e) {
    fail("cannot read " + f.filename().string() + " (truncated or corrupt?): " + e.what());
  }
  auto& [weights, meta] = loaded;
  if (meta["bundle_id"] != man.bundle_id)
    fail(f.filename().string() + " belongs to another bundle (another model?) than manifest.json");
  const json& tensors = m.at("weights").at("tensors");
  if (weights.size() != tensors.size())
    fail(f.filename().string() + " has " + std::to_string(weights.size()) + " tensors, manifest.json lists " +
         std::to_string(tensors.size()));
  for (auto& [name, spec] : tensors.items()) {
    auto it = weights.find(name);
    if (it == weights.end()) fail(f.filename().string() + " lacks " + name);
    mx::Shape shape;
    for (const auto& d : spec.at("shape")) shape.push_back(as_int(d, name + " shape"));
    if (it->second.shape() != shape || dtype_name(it->second.dtype()) != spec.at("dtype").get<std::string>())
      fail(f.filename().string() + ": " + name + " has another shape or dtype than manifest.json says");
    bool vision = name.rfind("vision_tower.", 0) == 0 || name.rfind("multi_modal_projector.", 0) == 0;
    (vision ? vision_w : decoder_w).insert_or_assign(name, it->second);
  }
}

Runner::Runner(const std::string& dir) {
  json m = read_manifest(dir);
  try {
    impl_ = std::make_unique<Impl>(dir, std::move(m));
  } catch (const json::exception& e) {
    fail(std::string("manifest.json lacks a field this runner needs or has the wrong type: ") + e.what());
  }
}

Runner::~Runner() = default;
const Manifest& Runner::manifest() const { return impl_->man; }

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

mx::array greedy(const mx::array& logprobs) { return mx::astype(mx::argmax(logprobs, -1), mx::int32); }
}  // namespace

std::string Runner::generate(const std::vector<float>& pixels, const std::vector<int>& ids, int max_tokens,
                             const std::function<bool(int)>& on_token, Timings& timings) {
  Impl& I = *impl_;
  const Manifest& M = I.man;
  int S = M.image_size, L = M.max_context;
  int T = static_cast<int>(ids.size());
  for (int id : ids)
    if (id < 0 || id >= M.embed_rows)
      fail("prompt token " + std::to_string(id) + " is past the model's embedding (" + std::to_string(M.embed_rows) +
           " rows): the tokenizer does not belong to this bundle");
  if (T > M.max_prompt_tokens)
    fail("prompt has " + std::to_string(T - M.num_image_tokens) + " text tokens; this bundle takes at most " +
         std::to_string(M.max_prompt_tokens - M.num_image_tokens) + " (re-export with a larger --prompt-tokens)");
  if (pixels.size() != static_cast<size_t>(S) * S * 3) fail("pixels do not match the bundle's image size");
  auto t0 = std::chrono::steady_clock::now();
  mx::array px(pixels.begin(), mx::Shape{1, S, S, 3}, mx::float32);
  mx::array features = (*I.encode)({px}, I.vision_w)[0];
  mx::eval(features);
  timings.vision_s = seconds_since(t0);

  auto t1 = std::chrono::steady_clock::now();
  // The shortest traced prompt length that holds the prompt: less padding to prefill.
  int P = *std::lower_bound(M.prompt_lengths.begin(), M.prompt_lengths.end(), T);
  std::vector<int32_t> padded(P, M.ids.pad);
  std::copy(ids.begin(), ids.end(), padded.begin());
  mx::array id_arr(padded.begin(), mx::Shape{1, P}, mx::int32);
  std::vector<mx::array> out = (*I.prefill)({id_arr, mx::array({T}, mx::int32), features}, I.decoder_w);
  std::vector<mx::array> cache(out.begin() + 1, out.end());
  if (cache.empty() || out[0].shape(-1) != M.vocab_size || cache[0].shape(-2) != L)
    fail("prefill.mlxfn returned other sizes than manifest.json says (vocabulary, max_context)");
  mx::array token = greedy(out[0]);
  out.clear();
  mx::async_eval({token});
  // Tokens the context still has room for: the first comes from prefill, each decode step
  // writes the previous token at positions T .. L-1.
  int budget = std::min(max_tokens, L - T + 1);
  int position = T;
  std::string finish = "length";
  std::chrono::steady_clock::time_point t2;
  for (int n = 0; n < budget; ++n) {
    std::optional<mx::array> next;
    if (n + 1 < budget) {
      // Queue the next step before reading this token (as pg_edge's generate_step does).
      std::vector<mx::array> args{mx::reshape(token, {1, 1}), mx::array({position}, mx::int32)};
      args.insert(args.end(), cache.begin(), cache.end());
      cache.clear();  // the graph holds the old cache now, so MLX may update it in place
      std::vector<mx::array> step = (*I.decode)(args, I.decoder_w);
      args.clear();
      cache.assign(step.begin() + 1, step.end());
      next.emplace(greedy(step[0]));
      mx::async_eval({*next});
    }
    int t = token.item<int32_t>();
    if (n == 0) {
      t2 = std::chrono::steady_clock::now();
      timings.prefill_s = std::chrono::duration<double>(t2 - t1).count();
    }
    if (t == M.ids.eos) {
      finish = "stop";
      break;
    }
    if (!on_token(t)) break;
    if (!next) break;
    token = *next;
    ++position;
  }
  timings.generation_s = seconds_since(t2);
  mx::synchronize();
  return finish;
}

}  // namespace pgedge
