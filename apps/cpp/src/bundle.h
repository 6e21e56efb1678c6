// A pg-edge bundle (written by `pg-edge export`): manifest, weights, the three graphs.
// This header names no MLX type, so only bundle.cpp pays for compiling MLX's headers.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "text.h"

namespace pgedge {

struct Manifest {
  std::string dir, bundle_id, mlx_version, tokenizer_file;
  int image_size = 0, num_image_tokens = 0, max_prompt_tokens = 0, max_context = 0;
  int vocab_size = 0;   // logits the graphs return (the real vocabulary)
  int embed_rows = 0;   // rows of the token embedding: every input id must be below it
  std::vector<int> prompt_lengths;  // padded lengths prefill has a trace for, ascending
  SpecialIds ids;
};

struct Timings {
  double vision_s = 0, prefill_s = 0, generation_s = 0;
};

class Runner {
 public:
  // Reads and checks the whole bundle before anything runs: every file a regular file inside the
  // bundle (plain names only, sizes bounded), manifest format, each graph's checksum and bundle
  // id, the manifest's sizes against those saved in each graph's metadata, the special token
  // ids against the embedding, the weights' bundle id, names, shapes and dtypes. Throws
  // std::runtime_error (one line).
  explicit Runner(const std::string& dir);
  ~Runner();
  const Manifest& manifest() const;

  // pixels: float32[S * S * 3] from preprocess(); ids: the prompt from Tokenizer::prompt_ids.
  // Greedy: calls on_token(id) for each generated id until eos (not passed on), max_tokens,
  // the end of the bundle's context, or on_token returning false. Returns "stop" or "length".
  std::string generate(const std::vector<float>& pixels, const std::vector<int>& ids, int max_tokens,
                       const std::function<bool(int)>& on_token, Timings& timings);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pgedge
