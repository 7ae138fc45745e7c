-- wrk script for POST /detect: cycles through image files, sent as multipart/form-data (field
-- `image`) or as the raw request body (Content-Type image/jpeg), or for POST /v2/models/NAME/infer
-- as one BYTES tensor with the binary tensor data extension (mode v2), and prints one JSON line of
-- results at the end (requests, errors, latency percentiles in ms).
-- Usage: wrk -t1 -c8 -d10s -s wrk_detect.lua URL -- multipart|raw|v2 FILE...
-- The API key comes from DETOPS_API_KEY (as for every client of the repository).
local bodies, content_types, header_lengths, counter = {}, {}, {}, 0
local api_key = os.getenv("DETOPS_API_KEY")
local boundary = "detops-bench-boundary"

local function read(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  local mode = args[1]
  for i = 2, #args do
    local data = read(args[i])
    if mode == "raw" then
      bodies[#bodies + 1] = data
      content_types[#content_types + 1] = "image/jpeg"
    elseif mode == "v2" then
      -- Open Inference Protocol, binary tensor data: a JSON header, then one BYTES element (length, bytes).
      local n = #data
      local header = '{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"parameters":' ..
        '{"binary_data_size":' .. (n + 4) .. '}}],"parameters":{"binary_data_output":true}}'
      bodies[#bodies + 1] = header .. string.char(n % 256, math.floor(n / 256) % 256,
        math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256) .. data
      content_types[#content_types + 1] = "application/octet-stream"
      header_lengths[#bodies] = tostring(#header)
    else
      bodies[#bodies + 1] = "--" .. boundary .. "\r\n" ..
        'Content-Disposition: form-data; name="image"; filename="bench.jpg"\r\n' ..
        "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
      content_types[#content_types + 1] = "multipart/form-data; boundary=" .. boundary
    end
  end
  -- Threads start at different images so that no two consecutive requests share one.
  counter = math.random(#bodies)
end

function request()
  counter = counter % #bodies + 1
  local headers = {["Content-Type"] = content_types[counter]}
  if header_lengths[counter] then
    headers["Inference-Header-Content-Length"] = header_lengths[counter]
  end
  if api_key and api_key ~= "" then
    headers["Authorization"] = "Bearer " .. api_key
  end
  return wrk.format("POST", nil, headers, bodies[counter])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_s": %.3f, "non_2xx": %d, "socket_errors": %d, "p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
