// The on-disk format of one slot's header (torch-free).
//
// A slot is a kSlotHeaderBytes header, then the page payload, then zero padding up to the
// O_DIRECT alignment. Header fields, at fixed offsets, in host byte order:
//
//   offset  bytes  field
//        0      8  magic "PKVSLOT1"
//        8      4  format version (kSlotFormatVersion)
//       12      4  header bytes (kSlotHeaderBytes)
//       16      4  tenant (int32)
//       20      4  reserved, zero
//       24      8  session (int64)
//       32      8  logical page (int64)
//       40      8  generation (uint64)
//       48      8  payload bytes (uint64)
//       56      8  payload checksum (checksum64 of the payload bytes)
//       64      8  header checksum (checksum64 of the whole header, this field read as zero)
//       72   4024  zero
//
// The header checksum covers the padding as well, so damage anywhere in the header is caught.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "store/disk_store.h"

namespace paged_kv::store {

constexpr size_t kSlotHeaderBytes = 4096;
constexpr uint32_t kSlotFormatVersion = 1;
constexpr char kSlotMagic[8] = {'P', 'K', 'V', 'S', 'L', 'O', 'T', '1'};

// Bytes of one slot for `page_bytes` of payload: the header plus the payload rounded up to the
// 4 KiB alignment.
int64_t slot_bytes_for(int64_t page_bytes);

// Fills `header` (kSlotHeaderBytes) for a payload of `payload_bytes` whose checksum is
// `payload_checksum`, stored under `tag`.
void encode_slot_header(unsigned char* header, const SlotTag& tag, uint64_t payload_bytes,
                        uint64_t payload_checksum);

// Checks `header` (kSlotHeaderBytes) in this order: magic, header checksum, format version,
// header size, payload size (against `payload_bytes`), tag (against `expected`). Returns "" when
// all hold, and puts the stored payload checksum in `*payload_checksum`; else returns why not,
// naming the field, what the slot holds and what was expected.
std::string check_slot_header(const unsigned char* header, const SlotTag& expected,
                              uint64_t payload_bytes, uint64_t* payload_checksum);

// "tenant 1, session 2, logical page 3, generation 4"
std::string describe_tag(const SlotTag& tag);

}  // namespace paged_kv::store
