// smtp-server adds an enhanced status code to every reply, chosen from the reply code alone, so a 451
// would always read 4.3.0. Our catalogue picks the enhanced code per error (451 4.4.1 for downstreams
// that are down), and puts it at the front of the text; this makes smtp-server keep ours instead of
// adding a second one.
import { SMTPConnection } from 'smtp-server/lib/smtp-connection';

const ENHANCED_PREFIX = /^[245]\.\d{1,3}\.\d{1,3} /;
let installed = false;

export function keepOwnEnhancedCodes(): void {
  if (installed) return;
  installed = true;
  const proto = SMTPConnection.prototype as unknown as { send(code: number, data?: unknown, context?: unknown): void };
  const send = proto.send;
  proto.send = function (this: unknown, code: number, data?: unknown, context?: unknown) {
    return send.call(this, code, data, typeof data === 'string' && ENHANCED_PREFIX.test(data) ? false : context);
  };
}
