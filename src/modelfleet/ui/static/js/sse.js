// Server-sent events from a fetch() Response body, as an async iterator of "data:" payloads.
// EventSource cannot POST, so the playground reads the stream itself:
//   for await (const data of sseData(response)) { if (data === "[DONE]") break; … }

export async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const separator = /\r?\n\r?\n/;
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // One event ends at a blank line; a read may hold several events or half of one.
      let match;
      while ((match = separator.exec(buffer)) !== null) {
        const event = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = dataOf(event);
        if (data !== null) yield data;
      }
    }
    const rest = dataOf(buffer); // a last event without its blank line
    if (rest !== null) yield rest;
  } finally {
    reader.releaseLock();
  }
}

/** The data of one event: its "data:" lines joined by newlines; null for comments and others. */
function dataOf(event) {
  const lines = event.split(/\r?\n/).filter((l) => l.startsWith("data:"));
  if (!lines.length) return null;
  return lines.map((l) => l.slice(5).replace(/^ /, "")).join("\n");
}
