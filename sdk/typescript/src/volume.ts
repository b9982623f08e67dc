/** Volumes: disks that outlive sandboxes, mounted into them at create. */

import { Client } from "./client.js";
import { Conflict, VolumeNotFound } from "./errors.js";
import type { VolumeInfo } from "./types.js";

export interface VolumeOptions {
  /** Its size in MiB (default 1024). */
  sizeMb?: number;
  client?: Client;
}

export class Volume {
  /** @internal */
  constructor(
    private readonly client: Client,
    private info: VolumeInfo,
    /** This handle mounts the volume read-only. */
    readonly isReadOnly = false,
  ) {}

  get id(): string {
    return this.info.id;
  }
  get name(): string {
    return this.info.name;
  }
  get sizeMb(): number {
    return this.info.size_mb;
  }
  get createdAt(): number {
    return this.info.created_at;
  }
  /** Bytes in use, as of when fetched (`refresh()` fetches again). */
  get usedBytes(): number {
    return this.info.used_bytes;
  }
  /** Your live sandboxes that mount it, as of when fetched. */
  get sandboxes(): string[] {
    return this.info.sandboxes;
  }

  /** Make an empty volume named `name` (`Conflict`, code "volume_exists", if you have one). */
  static async create(name: string, options: VolumeOptions = {}): Promise<Volume> {
    const client = options.client ?? Client.default();
    const json = { name, size_mb: options.sizeMb ?? 1024 };
    return new Volume(client, await client.request<VolumeInfo>("POST", "/v1/volumes", { json }));
  }

  /** Your volume with this name or id; made if missing and `createIfMissing`, else `VolumeNotFound`. */
  static async fromName(name: string, options: VolumeOptions & { createIfMissing?: boolean } = {}): Promise<Volume> {
    const client = options.client ?? Client.default();
    const get = async () => new Volume(client, await client.request<VolumeInfo>("GET", `/v1/volumes/${encodeURIComponent(name)}`));
    try {
      return await get();
    } catch (error) {
      if (!(error instanceof VolumeNotFound) || !options.createIfMissing) throw error;
    }
    try {
      return await Volume.create(name, { ...options, client });
    } catch (error) {
      if (error instanceof Conflict && error.code === "volume_exists") return get(); // made meanwhile
      throw error;
    }
  }

  /** Your volumes, oldest first. */
  static async list(options: { client?: Client } = {}): Promise<Volume[]> {
    const client = options.client ?? Client.default();
    return (await client.request<VolumeInfo[]>("GET", "/v1/volumes")).map((info) => new Volume(client, info));
  }

  /** Fetch its use and mounts again. */
  async refresh(): Promise<Volume> {
    this.info = await this.client.request<VolumeInfo>("GET", `/v1/volumes/${this.id}`);
    return this;
  }

  /** Delete it and its content (`VolumeInUse` while a live sandbox mounts it). */
  async delete(): Promise<void> {
    await this.client.request("DELETE", `/v1/volumes/${this.id}`);
  }

  /** The same volume, to mount read-only. */
  readOnly(): Volume {
    return new Volume(this.client, this.info, true);
  }
}

/** A volume, or the name or id of one of yours. */
export type VolumeRef = Volume | string;

/** `{"/data": volume}` as the API's `volumes` list; a string is a name or id, mounted read-write. */
export function mountsBody(volumes: Record<string, VolumeRef>): { path: string; volume: string; read_only: boolean }[] {
  return Object.entries(volumes).map(([path, volume]) =>
    volume instanceof Volume
      ? { path, volume: volume.id, read_only: volume.isReadOnly }
      : { path, volume, read_only: false },
  );
}
