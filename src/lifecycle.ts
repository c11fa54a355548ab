// The lifecycle every long-lived resource goes through, fastify-style: parts start in the order given
// and close in the reverse order, so a part may rely on every part started before it, up to its own
// close. A start that fails closes what had already started.

/** One thing that opens a resource and knows how to close it (a listener, a watcher, a store). */
export interface Part {
  /** Named in the log when it fails to close. */
  readonly name: string;
  start(): Promise<void> | void;
  close(): Promise<void> | void;
}

export class Lifecycle {
  private readonly started: Part[] = [];

  /** `onCloseError` hears about a part that failed to close; the parts before it close all the same. */
  constructor(private readonly onCloseError: (part: Part, err: unknown) => void) {}

  /** Starts each part in order; when one fails, the started ones close (last first) and the error is rethrown. */
  async start(parts: readonly Part[]): Promise<void> {
    for (const part of parts) {
      try {
        await part.start();
      } catch (err) {
        await this.close();
        throw err;
      }
      this.started.push(part);
    }
  }

  /** Closes every started part, last started first. */
  async close(): Promise<void> {
    for (let part = this.started.pop(); part; part = this.started.pop()) {
      try {
        await part.close();
      } catch (err) {
        this.onCloseError(part, err);
      }
    }
  }
}
