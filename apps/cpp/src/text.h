// Tokenizer (SentencePiece's C++ library), prompt layout and the detection-output parser.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace pgedge {

struct SpecialIds {
  int bos = 2, eos = 1, pad = 0, image = 257152;
  std::vector<int> newline;  // "\n" tokenized on its own
};

class Tokenizer {
 public:
  Tokenizer(const std::string& model_file, SpecialIds ids);
  ~Tokenizer();
  std::vector<int> encode(const std::string& text) const;
  // As pg_edge's Tokenizer.decode: <bos>/<eos>/<pad> and ids past the vocabulary dropped.
  std::string decode(const std::vector<int>& ids) const;
  // <image> x num_image_tokens, <bos>, prefix, "\n" (pg_edge's processor layout).
  std::vector<int> prompt_ids(const std::string& prefix, int num_image_tokens) const;
  const SpecialIds& ids() const { return ids_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  SpecialIds ids_;
  int pieces_ = 0;
};

// Incremental text: each add() returns what is new, holding back a trailing U+FFFD (a
// multi-byte character whose bytes have not all arrived); the pieces add up to decode(all).
class StreamText {
 public:
  explicit StreamText(const Tokenizer& tok) : tok_(tok) {}
  std::string add(int token);
  std::string finish();
  const std::string& text() const { return emitted_; }

 private:
  const Tokenizer& tok_;
  std::vector<int> ids_;
  std::string emitted_;
};

struct DetectedObject {
  std::string label;
  double box[4];  // x1, y1, x2, y2 in pixels of the original image
  int loc[4];     // y1, x1, y2, x2 bins, 0..1023
  std::vector<int> seg;  // 16 mask codes, or empty
};

struct Skipped {
  std::string text, reason;
};

// pg_edge.tasks.parse.parse_objects' grammar: objects joined by ";", each <locY1><locX1><locY2><locX2>
// [<segNNN> x 16] label; bins / 1023 * image size; malformed pieces skipped with a reason.
void parse_objects(const std::string& text, int width, int height, std::vector<DetectedObject>& objects,
                   std::vector<Skipped>& skipped);

}  // namespace pgedge
