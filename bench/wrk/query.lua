-- GET a task query for each id in the file BENCH_IDS, in turn, under the path BENCH_PATH
-- (".../tasks/"), with the key BENCH_KEY. Every wrk thread starts at a different id.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

local path = os.getenv("BENCH_PATH")
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do
  if #line > 0 then ids[#ids + 1] = line end
end
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")

local made = 0
function setup(thread)
  made = made + 1
  thread:set("start", made * 7919)
end

local next_id = 0
function init(args)
  next_id = (start or 0) % #ids
end

function request()
  next_id = next_id % #ids + 1
  return wrk.format("GET", path .. ids[next_id])
end
