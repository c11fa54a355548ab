// ctx.state on the host side: one user's keys in the shared StateStore, under `sel:<user>:`, with the
// bounds of bounds.ts checked again here (the isolate checks them first, but the host trusts nothing
// that crosses). Answers are plain records; the bootstrap turns a failure into a thrown StateError.
import type { StateCode } from '../errors';
import { keyPart, StateFullError, StateTypeError, type StateScope, type StateStore } from '../state/store';
import { BOUNDS, STATE_KEYS_PER_USER } from './bounds';

export type StateRecord = { ok: true; json?: string; value?: number } | { ok: false; code: StateCode; message?: string };

const refuse = (code: StateCode, message?: string): StateRecord => ({ ok: false, code, message });

export class SelectorState {
  private readonly prefix: string;
  private readonly scope: StateScope;

  constructor(
    private readonly store: StateStore,
    user: string,
  ) {
    // A login may contain ':' (the config only asks for a non-empty string): escaped, so that
    // "a@x:b" and key "c" can never be "a@x" and key "b:c". Logins without ':' or '%' are unchanged.
    const name = `sel:${keyPart(user.toLowerCase())}`;
    this.prefix = `${name}:`;
    this.scope = { name, maxKeys: STATE_KEYS_PER_USER };
  }

  /** One ctx.state call as the isolate made it; never rejects. */
  async call(op: unknown, key: unknown, arg: unknown, ttlMs: unknown): Promise<StateRecord> {
    if (typeof key !== 'string' || key.length === 0 || key.length > BOUNDS.stateKey) return refuse('SMTPMUX_STATE_BAD_KEY');
    if (ttlMs !== undefined && (!Number.isSafeInteger(ttlMs) || (ttlMs as number) < 1 || (ttlMs as number) > BOUNDS.ttlMs)) return refuse('SMTPMUX_STATE_BAD_TTL');
    const ttl = ttlMs as number | undefined;
    const stored = this.prefix + key;
    try {
      switch (op) {
        case 'get': {
          const json = await this.store.get(stored);
          return json === undefined ? { ok: true } : { ok: true, json };
        }
        case 'set':
          if (typeof arg !== 'string' || !isJson(arg)) return refuse('SMTPMUX_STATE_NOT_JSON');
          if (arg.length > BOUNDS.stateValue) return refuse('SMTPMUX_STATE_TOO_BIG');
          await this.store.set(stored, arg, ttl, this.scope);
          return { ok: true };
        case 'incr':
          if (!Number.isSafeInteger(arg)) return refuse('SMTPMUX_STATE_NOT_INTEGER');
          return { ok: true, value: await this.store.incr(stored, arg as number, ttl, this.scope) };
        default:
          return refuse('SMTPMUX_STATE_UNAVAILABLE');
      }
    } catch (err) {
      if (err instanceof StateFullError) return refuse('SMTPMUX_STATE_FULL', `${STATE_KEYS_PER_USER} keys at most`);
      if (err instanceof StateTypeError) return refuse('SMTPMUX_STATE_NOT_INTEGER', `"${key}" does not hold an integer`);
      // A backend's own message may name its address: the script gets the code only.
      return refuse('SMTPMUX_STATE_UNAVAILABLE');
    }
  }
}

function isJson(text: string): boolean {
  try {
    JSON.parse(text);
    return true;
  } catch {
    return false;
  }
}
